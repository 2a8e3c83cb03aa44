use super::parse::*;
use super::*;

const EXAMPLE: &str = r#"
admin:
  address: 127.0.0.1:9901
storage_network:
  interface: lhnet1
  network: kube-system/demo-10-30-0-0
  network_status_file: /etc/podinfo/annotations
  fallback: pod_ip
listeners:
  - name: management
    address: 0.0.0.0:8501
    kind: grpc
    routes:
      - match: { prefix: /imrpc.ProxyEngineService/ }
        local: longhorn_engine_proxy
      - match: { prefix: /ProcessManagerService/ }
        cluster: instance_manager
        retry_policy: { retry_on: "connect-failure,unavailable", num_retries: 2, per_try_timeout: 1s }
      - match:
          safe_regex: { regex: "/grpc\\.health\\.v1\\.Health/.*" }
          headers: [{ name: x-lhnet, exact_match: "1", invert_match: true }]
        local: health
        timeout: 10s
        max_stream_duration: { grpc_timeout_header_max: 30s }
clusters:
  - name: engines
    type: original_dst
    upstream_bind_config: { source_address: storage }
    allowed_destinations: [storage, 127.0.0.0/8]
    allowed_ports: [9500-9599, 10000-30000]
    connect_timeout: 2s
  - name: instance_manager
    type: static
    endpoints: [127.0.0.1:8500]
    upstream_bind_config: { source_address: none }
"#;

#[test]
fn parses_the_design_example() {
    let c = Config::parse(EXAMPLE, "example").unwrap();
    assert_eq!(c.listeners.len(), 1);
    let routes = &c.listeners[0].routes;
    assert_eq!(routes.len(), 3);
    assert_eq!(routes[0].name, "management/0");
    assert_eq!(
        routes[0].action,
        RouteAction::Local(LocalService::LonghornEngineProxy)
    );
    assert_eq!(
        routes[1].action,
        RouteAction::Cluster("instance_manager".into())
    );
    let retry = routes[1].retry_policy.as_ref().unwrap();
    assert_eq!(
        retry.retry_on,
        vec![RetryOn::ConnectFailure, RetryOn::Unavailable]
    );
    assert_eq!(
        (retry.num_retries, retry.per_try_timeout),
        (2, Some(Duration::from_secs(1)))
    );
    assert_eq!(routes[2].timeout, Some(Duration::from_secs(10)));
    assert_eq!(
        routes[2].grpc_timeout_header_max,
        Some(Duration::from_secs(30))
    );
    let engines = c.cluster("engines").unwrap();
    assert_eq!(engines.kind, ClusterKind::OriginalDst);
    assert_eq!(engines.allowed_ports, vec![9500..=9599, 10000..=30000]);
    assert!(engines.allowed_destinations[1].cidr_contains("127.1.2.3".parse().unwrap()));
    assert!(!engines.allowed_destinations[1].cidr_contains("10.0.0.1".parse().unwrap()));
    assert_eq!(
        c.cluster("instance_manager").unwrap().source_address,
        SourceAddress::None
    );
    assert_eq!(c.storage_network.fallback, Fallback::PodIp);
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    // The dump is valid JSON in the schema the file uses (Envoy names).
    let dump = serde_json::to_value(&c).unwrap();
    assert_eq!(
        dump["listeners"][0]["routes"][2]["match"]["safe_regex"]["regex"],
        "/grpc\\.health\\.v1\\.Health/.*"
    );
    assert_eq!(dump["clusters"][0]["allowed_destinations"][0], "storage");
}

#[test]
fn reports_all_five_mistakes_with_paths() {
    let bad = r#"
admin: { address: "localhost" }
listeners:
  - name: management
    address: 0.0.0.0:8501
    routes:
      - match: { prefx: /imrpc.ProxyEngineService/ }
        local: longhorn_engine_proxy
      - match: { prefix: /ProcessManagerService/ }
        cluster: instance_manger
        timeout: 5 seconds
clusters:
  - name: instance_manager
    endpoints: [127.0.0.1:8500]
    connect_timeout: 2s
    upstream_bind_config: { source_address: lhnet9 }
"#;
    let errs = Config::parse(bad, "bad.yaml").unwrap_err();
    let text: Vec<String> = errs.errors.iter().map(|e| e.to_string()).collect();
    let expect = [
        "admin.address: \"localhost\" is not an IP:PORT address",
        "listeners[0].routes[0].match: unknown key \"prefx\" (did you mean \"prefix\"?)",
        "listeners[0].routes[1].cluster: no cluster named \"instance_manger\"",
        "listeners[0].routes[1].timeout: \"5 seconds\"",
        "clusters[0].upstream_bind_config.source_address: \"lhnet9\" is not storage",
    ];
    for e in expect {
        assert!(
            text.iter().any(|t| t.starts_with(e)),
            "missing {e:?} in {text:#?}"
        );
    }
    assert!(errs.to_string().starts_with("bad.yaml: "), "{errs}");
}

#[test]
fn tcp_listeners_parse_and_bad_ones_are_named() {
    let good = r#"
listeners:
  - { name: data, kind: tcp, address: "storage:10000-10030", cluster: loopback }
  - { name: one, kind: tcp, address: "10.30.0.5:9502", cluster: loopback }
  - { name: fwd, kind: tcp, address: "127.0.0.1:0", cluster: local }
clusters: [{ name: local, type: static, endpoints: [127.0.0.1:7000] }]
"#;
    let c = Config::parse(good, "x").unwrap();
    assert_eq!(c.listeners[0].kind, ListenerKind::Tcp);
    assert_eq!(c.listeners[0].address.to_string(), "storage:10000-10030");
    assert_eq!(c.listeners[0].address.ports().count(), 31);
    assert_eq!(c.listeners[0].address.fixed_ip(), None);
    assert_eq!(c.listeners[1].address.to_string(), "10.30.0.5:9502");

    let bad = r#"
listeners:
  - { name: data, kind: tcp, address: "storage:10030-10000", routes: [] }
  - name: m
    address: 127.0.0.1:9000-9001
    routes: [{ match: { prefix: / }, cluster: engines }]
  - { name: t, kind: tcp, address: "127.0.0.1:7000", cluster: loopback }
  - { name: u, kind: tcp, address: "storage:7000", cluster: engines }
  - { name: v, kind: udp, address: "storage:7000" }
clusters: [{ name: engines, type: original_dst }]
"#;
    let text = Config::parse(bad, "x").unwrap_err().to_string();
    for want in [
        "listeners[0].address: \"storage:10030-10000\": the range must go up",
        "listeners[0]: missing required key \"cluster\"",
        "listeners[0]: unknown key \"routes\"",
        "listeners[1].address: \"127.0.0.1:9000-9001\": port ranges are for kind: tcp",
        "listeners[2].address: a loopback address forwarded to cluster loopback",
        "listeners[3].cluster: cluster \"engines\" is original_dst",
        "listeners[4].kind: \"udp\" is not a listener kind",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[test]
fn deep_nesting_is_refused_at_once_with_its_place() {
    let deep = format!("listeners: {}{}\n", "[".repeat(40_000), "]".repeat(40_000));
    // The scan's words, not the parser's "recursion limit exceeded": the parser never ran.
    let text = Config::parse(&deep, "deep.yaml").unwrap_err().to_string();
    assert!(
        text.contains("line 1 column 76: [ and { nested deeper than 64 levels"),
        "{text}"
    );
    // Mappings count too (the parser's own error would also name a line: the scan's words).
    let mapping = format!("x: {}1{}\n", "{a: ".repeat(100), "}".repeat(100));
    let text = Config::parse(&mapping, "x").unwrap_err().to_string();
    assert!(text.contains("nested deeper than 64 levels"), "{text}");
    // Brackets inside quotes, comments and plain scalars are not nesting.
    let fine = format!(
            "# {}\nlisteners:\n  - name: \"{}\"\n    address: 127.0.0.1:0 # {}\n    routes:\n      - match: {{ safe_regex: '^/a{}$' }}\n        local: health\n",
            "[".repeat(100),
            "{".repeat(100),
            "[".repeat(100),
            "[x]".repeat(100)
        );
    Config::parse(&fine, "fine").unwrap();
    let dir = std::env::temp_dir().join(format!("lhnet-utf8-{}", std::process::id()));
    std::fs::write(&dir, b"listeners: []\nadmin:\n  address: \"1\xff\"\n").unwrap();
    let text = Config::load(&dir).unwrap_err().to_string();
    let _ = std::fs::remove_file(&dir);
    assert!(text.contains("line 3 column 14: not UTF-8"), "{text}");
    let mut laughs = vec!["a0: &a0 [x, x, x, x, x, x, x, x, x, x]".to_string()];
    for i in 1..9 {
        laughs.push(format!(
            "a{i}: &a{i} [{}]",
            vec![format!("*a{}", i - 1); 10].join(", ")
        ));
    }
    laughs.push("listeners: *a8".into());
    let text = Config::parse(&laughs.join("\n"), "x")
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("repetition limit") && text.contains("on line 2"),
        "{text}"
    );
    let merge = "listeners:\n  # a comment\n  - <<: 5\n    name: x\n";
    let text = Config::parse(merge, "x").unwrap_err().to_string();
    assert!(
        text.contains("bad YAML merge key") && text.contains("on line 3"),
        "{text}"
    );
    let big = format!("listeners: []\n#{}\n", "x".repeat(MAX_CONFIG_BYTES));
    assert!(Config::parse(&big, "big")
        .unwrap_err()
        .to_string()
        .contains("the limit is"));
}

#[test]
fn listeners_cannot_share_a_socket_or_reach_the_admin_port() {
    let bad = r#"
admin: { address: 127.0.0.1:9901 }
listeners:
  - { name: a, address: 0.0.0.0:8501, routes: [] }
  - { name: b, address: 10.0.0.5:8501, routes: [] }
  - { name: data, kind: tcp, address: "storage:9000-9999", cluster: loopback }
  - { name: c, address: 127.0.0.1:9901, routes: [] }
  - { name: d, kind: tcp, address: "10.0.0.5:7000", cluster: adm }
  - { name: e, address: "storage:9500", routes: [] }
clusters: [{ name: adm, type: static, endpoints: [127.0.0.1:9901] }]
"#;
    let text = Config::parse(bad, "x").unwrap_err().to_string();
    for want in [
        "listeners[1].address: 10.0.0.5:8501 overlaps listener \"a\" (listeners[0]: 0.0.0.0:8501)",
        "listeners[2].address: ports storage:9000-9999 cover the admin port 9901",
        "listeners[3].address: 127.0.0.1:9901 overlaps the admin address 127.0.0.1:9901",
        "listeners[4].cluster: cluster \"adm\" has the admin address 127.0.0.1:9901 as an endpoint",
        "listeners[5].address: storage:9500 overlaps listener \"data\"",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // Different ports, different fixed IPs, and port 0 (a fresh port each time) are fine.
    let good = r#"
admin: { address: 127.0.0.1:9901 }
listeners:
  - { name: a, address: 10.0.0.5:8501, routes: [] }
  - { name: b, address: 10.0.0.6:8501, routes: [] }
  - { name: c, address: 127.0.0.1:0, routes: [] }
  - { name: d, address: 127.0.0.1:0, routes: [] }
  - { name: data, kind: tcp, address: "storage:10000-10030", cluster: loopback }
"#;
    Config::parse(good, "x").unwrap();
}

#[test]
fn passthrough_cluster_is_a_static_cluster_on_an_engine_proxy_route() {
    let clusters = "clusters:\n  - { name: engines, type: original_dst }\n  - { name: im, type: static, endpoints: [127.0.0.1:8501] }\n";
    let route = |extra: &str| {
        format!(
                "listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n      - {{ match: {{ prefix: / }}, local: longhorn_engine_proxy, {extra} }}\n      - {{ match: {{ prefix: /h }}, local: health, passthrough_cluster: im }}\n{clusters}"
            )
    };
    let text = Config::parse(&route("passthrough_cluster: im"), "x")
        .unwrap_err()
        .to_string();
    assert!(
            text.contains("listeners[0].routes[1].passthrough_cluster: only local: longhorn_engine_proxy routes take passthrough_cluster"),
            "{text}"
        );
    for (extra, want) in [
        (
            "passthrough_cluster: nope",
            "listeners[0].routes[0].passthrough_cluster: no cluster named \"nope\"",
        ),
        (
            "passthrough_cluster: engines",
            "listeners[0].routes[0].passthrough_cluster: cluster \"engines\" is original_dst",
        ),
    ] {
        let text = Config::parse(&route(extra), "x").unwrap_err().to_string();
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let good = format!(
            "listeners:\n  - name: m\n    address: 127.0.0.1:0\n    routes:\n      - {{ match: {{ prefix: / }}, local: longhorn_engine_proxy, passthrough_cluster: im }}\n{clusters}"
        );
    let c = Config::parse(&good, "x").unwrap();
    assert_eq!(
        c.listeners[0].routes[0].passthrough_cluster.as_deref(),
        Some("im")
    );
}

#[test]
fn backup_target_settings_and_mistakes() {
    let listeners = "listeners: [{ name: h, address: 127.0.0.1:0, routes: [{ match: { prefix: / }, local: health }] }]\n";
    let c = Config::parse(listeners, "x").unwrap();
    assert_eq!(c.backup_target, BackupTargetConfig::default());
    let good = format!(
            "{listeners}backup_target: {{ nfs_mount_root: /mnt/bs, nfs_mount: existing, max_concurrent: 2, timeout: 5s }}\n"
        );
    let c = Config::parse(&good, "x").unwrap();
    assert_eq!(
        c.backup_target.nfs_mount_root,
        std::path::Path::new("/mnt/bs")
    );
    assert_eq!(
        c.backup_target.nfs_mount,
        lhnet_backupstore::NfsMount::Existing
    );
    assert_eq!(
        (c.backup_target.max_concurrent, c.backup_target.timeout),
        (2, Duration::from_secs(5))
    );
    let listed = format!(
        "{listeners}backup_target: {{ allowed_endpoints: [\"minio.svc:9000\", 10.0.0.0/8, \"[fd00::/8]:9000-9010\"], instance_metadata: true }}\n"
    );
    let c = Config::parse(&listed, "x").unwrap();
    assert_eq!(
        c.backup_target.allowed_endpoints,
        ["minio.svc:9000", "10.0.0.0/8", "[fd00::/8]:9000-9010"]
    );
    assert!(c.backup_target.instance_metadata && c.backup_target.endpoints.instance_metadata);
    assert_eq!(
        c.backup_target.endpoints.entries(),
        c.backup_target.allowed_endpoints
    );
    let bad = format!(
            "{listeners}backup_target: {{ nfs_mount_root: mnt, nfs_mount: maybe, max_concurrent: 0, timeout: 5, s3: x, allowed_endpoints: [ok.example, \"host:99999\"], instance_metadata: sure }}\n"
        );
    let text = Config::parse(&bad, "x").unwrap_err().to_string();
    for want in [
        "backup_target.nfs_mount_root: \"mnt\" is not an absolute directory",
        "backup_target.nfs_mount: \"maybe\" is not auto or existing",
        "backup_target.max_concurrent: must be at least 1",
        "backup_target.timeout",
        "backup_target: unknown key \"s3\"",
        "backup_target.allowed_endpoints[1]: \"host:99999\" is not HOST[:PORTS]",
        "backup_target.instance_metadata",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert!(parse_duration("10").unwrap_err().contains("no unit"));
    assert!(parse_duration("3d").unwrap_err().contains("unknown unit"));
    let mut cx = Cx::default();
    assert_eq!(
        size(&Value::String("4Mi".into()), "x", &mut cx),
        Some(4 << 20)
    );
    assert_eq!(size(&Value::String("4Xi".into()), "x", &mut cx), None);
    assert_eq!(cx.errors.len(), 1);
}

#[test]
fn not_yaml_is_one_clear_error() {
    let err = Config::parse("listeners: [", "broken.yaml").unwrap_err();
    assert_eq!(err.errors.len(), 1);
    assert!(err.errors[0].message.starts_with("not valid YAML"), "{err}");
}

#[test]
fn a_listener_is_read_with_every_kinds_keys_and_no_more() {
    let mut union: Vec<&str> = GRPC_LISTENER_KEYS
        .iter()
        .chain(TCP_LISTENER_KEYS)
        .chain(HTTP_CONNECT_LISTENER_KEYS)
        .copied()
        .collect();
    union.sort_unstable();
    union.dedup();
    let mut listener = LISTENER_KEYS.to_vec();
    listener.sort_unstable();
    assert_eq!(listener, union);
}

#[test]
fn an_unknown_key_is_named_with_the_nearest_one_of_its_section() {
    let text = "listeners:\n  - name: l\n    address: 127.0.0.1:0\n    routes: []\n    max_conections: 5\n    idle_timeut: 1s\n  - name: t\n    kind: tcp\n    address: 127.0.0.1:0\n    cluster: loopback\n    routes: []\n";
    let errors = Config::parse(text, "t").unwrap_err().to_string();
    for want in [
        "listeners[0]: unknown key \"max_conections\" (did you mean \"max_connections\"?)",
        "listeners[0]: unknown key \"idle_timeut\" (did you mean \"idle_timeout\"?)",
        // A tcp listener has no routes: the gRPC table does not apply to it.
        "listeners[1]: unknown key \"routes\"",
    ] {
        assert!(errors.contains(want), "missing {want:?} in\n{errors}");
    }
}

/// `/config_dump` is in the schema operators write: the dump of a config, read back as a
/// config, dumps the same.
#[test]
fn the_dump_reads_back_as_the_same_config() {
    let text = r#"
admin: { address: 127.0.0.1:9901 }
storage_network: { interface: lhnet1, network: kube-system/net, fallback: pod_ip }
listeners:
  - name: management
    address: 0.0.0.0:8501
    max_connections: 99
    stream_idle_timeout: 7s
    send_timeout: 2m
    max_message_size: 1Mi
    http2_protocol_options: { max_concurrent_streams: 50, connection_keepalive: { interval: 10s, timeout: 3s } }
    routes:
      - match: { prefix: /imrpc.ProxyEngineService/ }
        local: longhorn_engine_proxy
        passthrough_cluster: im
      - match: { prefix: /ProcessManagerService/ }
        cluster: im
        retry_policy: { retry_on: "connect-failure,unavailable", num_retries: 2, per_try_timeout: 1s }
      - name: odd
        match:
          path: /x.Y/Z
          headers:
            - { name: x-a, prefix_match: b }
            - { name: x-c, present_match: true }
            - { name: x-d, safe_regex_match: { regex: "^d+$" }, invert_match: true }
            - { name: x-e, exact_match: e }
        cluster: replicas
        timeout: 10s
        max_stream_duration: { grpc_timeout_header_max: 30s }
      - match: { safe_regex: { regex: "/grpc\\.health\\.v1\\.Health/.*" } }
        local: health
  - name: data
    kind: tcp
    address: storage:10000-10010
    cluster: loopback
clusters:
  - name: engines
    type: original_dst
    upstream_bind_config: { source_address: storage }
    allowed_destinations: [storage, 127.0.0.0/8]
    allowed_ports: [9500-9599, 10000-30000]
    connect_timeout: 2s
  - name: im
    endpoints: [127.0.0.1:8500]
    upstream_bind_config: { source_address: none }
  - name: replicas
    endpoints: [127.0.0.1:9502, 127.0.0.1:9503]
    upstream_bind_config: { source_address: 10.30.0.7, bind_to_device: lhnet1 }
    circuit_breakers: { max_requests: 64, max_requests_per_downstream_connection: 8 }
    max_connections_per_endpoint: 2
    streams_per_connection: 32
    idle_timeout: 90s
peers:
  10.0.0.5: 10.30.0.5
peer_lookup: { port: 8600, timeout: 500ms }
drain_timeout: 5s
"#;
    let config = Config::parse(text, "t").unwrap_or_else(|e| panic!("{e}"));
    let dumped = serde_json::to_string_pretty(&config).unwrap();
    let again = Config::parse(&dumped, "dump").unwrap_or_else(|e| panic!("{e}\n{dumped}"));
    let redumped = serde_json::to_string_pretty(&again).unwrap();
    assert_eq!(dumped, redumped);
    let limits = &again.listeners[0].limits;
    assert_eq!(limits.send_timeout, Duration::from_secs(120));
    assert_eq!(limits.stream_idle_timeout, Duration::from_secs(7));
}
