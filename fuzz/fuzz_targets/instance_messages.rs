#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lhnet_proxy::fuzzing::instance_messages(data));
