//! Sidecar injection into Longhorn's instance-manager and backing-image-manager pods: one
//! function computes the JSON Patch (RFC 6902) for a pod, used by the `inject` command (which
//! applies it to YAML documents) and by the admission webhook (which returns it).
//!
//! What is added never touches `containers[0]` or the fields Longhorn compares to decide that
//! an instance-manager is out of sync (`spec/kubernetes.md` §2.4): lhnet goes into
//! `initContainers` as a native sidecar (`restartPolicy: Always`).

pub mod capture;
pub mod webhook;

use serde_json::{json, Map, Value};

/// The sidecar's container name; its presence means "already injected".
pub const SIDECAR_NAME: &str = "lhnet-proxy";
/// The capture init container's name.
pub const CAPTURE_NAME: &str = "lhnet-capture";
/// Pods with this annotation set to `disabled` are left alone.
pub const OPT_OUT_ANNOTATION: &str = "lhnet.io/inject";
/// Set on injected pods: the mode they were injected in.
pub const INJECTED_ANNOTATION: &str = "lhnet.io/injected";
pub const COMPONENT_LABEL: &str = "longhorn.io/component";
pub const COMPONENTS: [&str; 2] = ["instance-manager", "backing-image-manager"];
pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";
const CONFIG_VOLUME: &str = "lhnet-config";
const PODINFO_VOLUME: &str = "lhnet-podinfo";
/// Longhorn's mTLS secret as its instance-manager pods mount it (`/tls-files`, optional): the
/// sidecar mounts the pod's own volume of that name, or adds it.
pub const TLS_VOLUME: &str = "longhorn-grpc-tls";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// lhnet on its own ports (8510-8513).
    Sidecar,
    /// Also an init container that redirects 8500-8503 arriving from outside the pod to lhnet.
    Capture,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sidecar => "sidecar",
            Mode::Capture => "capture",
        }
    }
}

#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub mode: Mode,
    pub image: String,
    /// `(namespace, name)` of the NetworkAttachmentDefinition for `lhnet1`.
    pub storage_network: Option<(String, String)>,
    /// The ConfigMap holding lhnet's `config.yaml`.
    pub config_map: String,
    /// lhnet's proxy-API port (the instance-manager's own 8501 is taken).
    pub proxy_port: u16,
    /// lhnet's process-manager port (8500 is taken).
    pub process_manager_port: u16,
    /// lhnet's DiskService port (8502 is taken).
    pub disk_port: u16,
    /// lhnet's InstanceService port (8503 is taken).
    pub instance_port: u16,
    pub admin_port: u16,
    /// CPU and memory, requests equal to limits.
    pub cpu: String,
    pub memory: String,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            mode: Mode::Sidecar,
            image: format!("ghcr.io/lhnet/lhnet-proxy:{}", env!("CARGO_PKG_VERSION")),
            storage_network: None,
            config_map: "lhnet-sidecar".into(),
            proxy_port: 8511,
            process_manager_port: 8510,
            disk_port: 8512,
            instance_port: 8513,
            admin_port: 9901,
            cpu: "100m".into(),
            memory: "64Mi".into(),
        }
    }
}

/// The injection settings file of `lhnet-proxy webhook --config` (every key optional):
/// `image`, `mode` (sidecar | capture), `storage_network` (NS/NAME), `config_map`, `cpu`, `memory`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectSettings {
    pub image: Option<String>,
    pub mode: Option<String>,
    pub storage_network: Option<String>,
    pub config_map: Option<String>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
}

impl InjectSettings {
    pub fn load(path: &std::path::Path) -> Result<InjectOptions, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let s: InjectSettings =
            serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut opts = InjectOptions::default();
        if let Some(image) = s.image {
            opts.image = image;
        }
        opts.mode = match s.mode.as_deref() {
            None | Some("sidecar") => Mode::Sidecar,
            Some("capture") => Mode::Capture,
            Some(other) => {
                return Err(format!(
                    "{}: mode {other:?}: use sidecar or capture",
                    path.display()
                ))
            }
        };
        if let Some(nad) = s.storage_network {
            opts.storage_network =
                Some(parse_storage_network(&nad).map_err(|e| format!("{}: {e}", path.display()))?);
        }
        if let Some(cm) = s.config_map {
            opts.config_map = cm;
        }
        if let Some(cpu) = s.cpu {
            opts.cpu = cpu;
        }
        if let Some(memory) = s.memory {
            opts.memory = memory;
        }
        Ok(opts)
    }
}

/// Parses `NS/NAME`: two DNS-1123 labels.
pub fn parse_storage_network(text: &str) -> Result<(String, String), String> {
    let (ns, name) = text.split_once('/').ok_or_else(|| {
        format!("--storage-network {text:?}: write NAMESPACE/NAME, e.g. kube-system/demo-10-30-0-0")
    })?;
    for (what, label) in [("namespace", ns), ("name", name)] {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "--storage-network {text:?}: the {what} {label:?} is not a DNS-1123 label \
                 (lower-case letters, digits and '-', at most 63, not starting or ending with '-')"
            ));
        }
    }
    Ok((ns.to_string(), name.to_string()))
}

/// What to do with one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Apply these operations (paths relative to the document root); warnings to report.
    Inject {
        patch: Vec<Value>,
        warnings: Vec<String>,
    },
    /// Leave it, and why.
    Skip(String),
}

/// RFC 6901: `~` → `~0`, `/` → `~1`.
pub fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
}

/// The Multus request exactly as Longhorn writes it.
pub fn networks_annotation(namespace: &str, name: &str) -> String {
    format!(r#"[{{"namespace": "{namespace}", "name": "{name}", "interface": "lhnet1"}}]"#)
}

/// The patch for the pod whose `metadata` and `spec` sit at `prefix` in the document (`""` for
/// a Pod, `/spec/template` for a Deployment, ...). `metadata` and `spec` are the pod's.
pub fn pod_patch(
    metadata: &Value,
    spec: &Value,
    prefix: &str,
    opts: &InjectOptions,
) -> Result<Decision, String> {
    let component = str_at(metadata, &["labels", COMPONENT_LABEL]);
    if !component.is_some_and(|c| COMPONENTS.contains(&c)) {
        return Ok(Decision::Skip(format!(
            "not an instance-manager or backing-image-manager pod (label {COMPONENT_LABEL} is {})",
            component.map_or("absent".to_string(), |c| format!("{c:?}"))
        )));
    }
    if str_at(metadata, &["annotations", OPT_OUT_ANNOTATION]) == Some("disabled") {
        return Ok(Decision::Skip(format!(
            "opted out ({OPT_OUT_ANNOTATION}: disabled)"
        )));
    }
    let spec = spec.as_object().ok_or("the pod has no spec mapping")?;
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or("the pod spec has no containers")?;
    let has = |list: Option<&Value>, name: &str| {
        list.and_then(Value::as_array).is_some_and(|l| {
            l.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
        })
    };
    if has(spec.get("initContainers"), SIDECAR_NAME) || has(Some(&json!(containers)), SIDECAR_NAME)
    {
        return Ok(Decision::Skip(
            "already injected (it has a lhnet-proxy container)".into(),
        ));
    }

    let mut patch = Vec::new();
    let mut warnings = Vec::new();
    let mut inits = vec![sidecar(opts)];
    if opts.mode == Mode::Capture {
        // Runs to completion before the sidecar starts.
        inits.insert(0, capture(opts));
    }
    match spec.get("initContainers").and_then(Value::as_array) {
        Some(_) => {
            // First, so lhnet is up before any other init container or the Longhorn one.
            for c in inits.into_iter().rev() {
                patch.push(json!({"op": "add", "path": format!("{prefix}/spec/initContainers/0"), "value": c}));
            }
        }
        None => patch.push(
            json!({"op": "add", "path": format!("{prefix}/spec/initContainers"), "value": inits}),
        ),
    }
    let mut volumes = volumes(opts);
    let has_tls = spec
        .get("volumes")
        .and_then(Value::as_array)
        .is_some_and(|vs| {
            vs.iter()
                .any(|v| v.get("name").and_then(Value::as_str) == Some(TLS_VOLUME))
        });
    if !has_tls {
        volumes.push(json!({
            "name": TLS_VOLUME,
            "secret": {"secretName": TLS_VOLUME, "optional": true}
        }));
    }
    match spec.get("volumes").and_then(Value::as_array) {
        Some(existing) => {
            for v in volumes {
                let name = v.get("name").and_then(Value::as_str).unwrap_or_default();
                if existing
                    .iter()
                    .any(|e| e.get("name").and_then(Value::as_str) == Some(name))
                {
                    return Err(format!(
                        "the pod already has a volume named {name}; lhnet needs that name"
                    ));
                }
                patch.push(
                    json!({"op": "add", "path": format!("{prefix}/spec/volumes/-"), "value": v}),
                );
            }
        }
        None => patch
            .push(json!({"op": "add", "path": format!("{prefix}/spec/volumes"), "value": volumes})),
    }

    let mut annotations = Map::new();
    annotations.insert(INJECTED_ANNOTATION.into(), json!(opts.mode.as_str()));
    if let Some((ns, name)) = &opts.storage_network {
        let wanted = networks_annotation(ns, name);
        match str_at(metadata, &["annotations", NETWORKS_ANNOTATION]) {
            None => {
                annotations.insert(NETWORKS_ANNOTATION.into(), json!(wanted));
            }
            Some(existing) if existing == wanted => {}
            Some(existing) => warnings.push(format!(
                "the pod already has {NETWORKS_ANNOTATION}: {existing}; left as it is (wanted {wanted})"
            )),
        }
    }
    match metadata.get("annotations").and_then(Value::as_object) {
        Some(_) => {
            for (k, v) in annotations {
                patch.push(json!({
                    "op": "add",
                    "path": format!("{prefix}/metadata/annotations/{}", escape_pointer(&k)),
                    "value": v
                }));
            }
        }
        None => patch.push(json!({
            "op": "add",
            "path": format!("{prefix}/metadata/annotations"),
            "value": Value::Object(annotations)
        })),
    }
    Ok(Decision::Inject { patch, warnings })
}

fn resources(opts: &InjectOptions) -> Value {
    // Limits equal to requests: a Guaranteed pod stays Guaranteed.
    let r = json!({"cpu": opts.cpu, "memory": opts.memory});
    json!({"requests": r.clone(), "limits": r})
}

fn sidecar(opts: &InjectOptions) -> Value {
    let admin_probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": "lhnet-admin"},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 1
        })
    };
    json!({
        "name": SIDECAR_NAME,
        "image": opts.image,
        "restartPolicy": "Always",
        "args": ["--config", "/etc/lhnet/config.yaml"],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        ],
        "ports": [
            {"name": "lhnet-proxy", "containerPort": opts.proxy_port, "protocol": "TCP"},
            {"name": "lhnet-pm", "containerPort": opts.process_manager_port, "protocol": "TCP"},
            {"name": "lhnet-disk", "containerPort": opts.disk_port, "protocol": "TCP"},
            {"name": "lhnet-instance", "containerPort": opts.instance_port, "protocol": "TCP"},
            {"name": "lhnet-admin", "containerPort": opts.admin_port, "protocol": "TCP"}
        ],
        "startupProbe": admin_probe("/ready", 1, 120),
        "readinessProbe": admin_probe("/ready", 5, 3),
        "livenessProbe": admin_probe("/live", 10, 3),
        "resources": resources(opts),
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "capabilities": {"drop": ["ALL"]}
        },
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": "/etc/lhnet", "readOnly": true},
            {"name": PODINFO_VOLUME, "mountPath": "/etc/podinfo", "readOnly": true},
            {"name": TLS_VOLUME, "mountPath": crate::tls::LONGHORN_TLS_DIR, "readOnly": true}
        ]
    })
}

fn capture(opts: &InjectOptions) -> Value {
    json!({
        "name": CAPTURE_NAME,
        "image": opts.image,
        "args": [
            "capture",
            "--redirect", format!("8500:{}", opts.process_manager_port),
            "--redirect", format!("8501:{}", opts.proxy_port),
            "--redirect", format!("8502:{}", opts.disk_port),
            "--redirect", format!("8503:{}", opts.instance_port)
        ],
        "resources": resources(opts),
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            // nft needs uid 0 in the pod's user namespace; NET_ADMIN is the only capability.
            "runAsNonRoot": false,
            "runAsUser": 0,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}
        }
    })
}

fn volumes(opts: &InjectOptions) -> Vec<Value> {
    vec![
        json!({"name": CONFIG_VOLUME, "configMap": {"name": opts.config_map}}),
        json!({
            "name": PODINFO_VOLUME,
            "downwardAPI": {"items": [
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
            ]}
        }),
    ]
}

/// Where the pod template sits in a document of this kind, if it has one.
pub fn pod_prefix(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// The decision for a whole document (a Pod or a workload with a pod template).
pub fn document_patch(doc: &Value, opts: &InjectOptions) -> Result<Decision, String> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("no kind: not a Kubernetes object")?;
    let Some(prefix) = pod_prefix(kind) else {
        return Ok(Decision::Skip(format!("a {kind} has no pod to inject")));
    };
    let pod = if prefix.is_empty() {
        doc
    } else {
        doc.pointer(prefix)
            .ok_or_else(|| format!("the {kind} has no pod template at {prefix}"))?
    };
    let empty = json!({});
    let metadata = pod.get("metadata").unwrap_or(&empty);
    let spec = pod.get("spec").ok_or("the pod has no spec")?;
    pod_patch(metadata, spec, prefix, opts)
}

/// Applies `add` operations (the only ones [`pod_patch`] makes) to `doc`.
pub fn apply_patch(doc: &mut Value, patch: &[Value]) -> Result<(), String> {
    for op in patch {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("patch operation without a path")?;
        let value = op
            .get("value")
            .cloned()
            .ok_or("patch operation without a value")?;
        if kind != "add" {
            return Err(format!("unsupported patch operation {kind:?}"));
        }
        let (parent, last) = path
            .rsplit_once('/')
            .ok_or_else(|| format!("bad patch path {path:?}"))?;
        let key = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .ok_or_else(|| format!("patch path {path:?}: {parent:?} does not exist"))?;
        match target {
            Value::Object(map) => {
                map.insert(key, value);
            }
            Value::Array(list) if key == "-" => list.push(value),
            Value::Array(list) => {
                let i: usize = key
                    .parse()
                    .map_err(|_| format!("patch path {path:?}: {key:?} is not an index"))?;
                if i > list.len() {
                    return Err(format!("patch path {path:?}: index {i} is past the end"));
                }
                list.insert(i, value);
            }
            _ => {
                return Err(format!(
                    "patch path {path:?}: {parent:?} is not a container"
                ))
            }
        }
    }
    Ok(())
}

/// Largest input `inject` reads.
pub const MAX_INPUT: usize = 8 << 20;

/// The result of injecting a multi-document YAML stream.
#[derive(Debug, Default)]
pub struct Transformed {
    pub output: String,
    /// One line per document: what happened to it (for stderr).
    pub notes: Vec<String>,
}

/// Splits a YAML stream at `---` lines, keeping each separator with the document after it.
fn split_documents(input: &str) -> Vec<(&str, &str)> {
    let mut docs = Vec::new();
    let mut sep = "";
    let mut start = 0;
    let mut offset = 0;
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            docs.push((sep, &input[start..offset]));
            sep = line;
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push((sep, &input[start..]));
    docs
}

/// `lhnet-proxy inject`: injects every instance-manager and backing-image-manager pod (or pod
/// template) in a YAML stream. Other documents come out byte for byte as they went in.
pub fn transform(input: &str, opts: &InjectOptions) -> Result<Transformed, String> {
    if input.len() > MAX_INPUT {
        return Err(format!(
            "the input is {} bytes; inject reads at most {MAX_INPUT}",
            input.len()
        ));
    }
    let mut out = Transformed::default();
    for (i, (sep, text)) in split_documents(input).into_iter().enumerate() {
        let n = i + 1;
        out.output.push_str(sep);
        let blank = text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if blank {
            out.output.push_str(text);
            continue;
        }
        let doc: Value =
            serde_yaml_ng::from_str(text).map_err(|e| format!("document {n}: not YAML: {e}"))?;
        let what = match (
            doc.get("kind").and_then(Value::as_str),
            doc.pointer("/metadata/name").and_then(Value::as_str),
        ) {
            (Some(k), Some(name)) => format!("{k}/{name}"),
            (Some(k), None) => k.to_string(),
            (None, _) => {
                return Err(format!(
                "document {n}: not a Kubernetes object (no kind); inject reads Pods and workloads"
            ))
            }
        };
        match document_patch(&doc, opts).map_err(|e| format!("document {n} ({what}): {e}"))? {
            Decision::Skip(why) => {
                out.notes
                    .push(format!("document {n} ({what}): left as it is: {why}"));
                out.output.push_str(text);
            }
            Decision::Inject { patch, warnings } => {
                let mut doc = doc;
                apply_patch(&mut doc, &patch).map_err(|e| format!("document {n} ({what}): {e}"))?;
                let yaml = serde_yaml_ng::to_string(&doc)
                    .map_err(|e| format!("document {n} ({what}): {e}"))?;
                out.output.push_str(&yaml);
                if !yaml.ends_with('\n') {
                    out.output.push('\n');
                }
                out.notes.push(format!(
                    "document {n} ({what}): injected ({} mode)",
                    opts.mode.as_str()
                ));
                for w in warnings {
                    out.notes
                        .push(format!("document {n} ({what}): warning: {w}"));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn im_pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "instance-manager-3c9f",
                "namespace": "longhorn-system",
                "labels": {"longhorn.io/component": "instance-manager"}
            },
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "instance-manager", "image": "longhornio/longhorn-instance-manager:v1.3.3"}]
            }
        })
    }

    #[test]
    fn other_documents_pass_byte_for_byte_and_bad_input_is_named() {
        let input = "# leading comment\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a:   \"1\"}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: im\n  labels: {longhorn.io/component: instance-manager}\nspec:\n  containers: [{name: instance-manager, image: i}]\n--- # third\nkind: Service\nmetadata: {name: s}\n";
        let out = transform(input, &InjectOptions::default()).unwrap();
        assert!(out.output.starts_with("# leading comment\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a:   \"1\"}\n---\n"));
        assert!(out
            .output
            .ends_with("--- # third\nkind: Service\nmetadata: {name: s}\n"));
        assert!(out.output.contains("lhnet-proxy"));
        assert_eq!(out.notes.len(), 3, "{:?}", out.notes);
        assert!(out.notes[1].contains("Pod/im): injected"));
        // Injecting the output again changes nothing.
        let again = transform(&out.output, &InjectOptions::default()).unwrap();
        assert_eq!(again.output, out.output);

        let e = transform("kind: Pod\n  bad: [", &InjectOptions::default()).unwrap_err();
        assert!(e.starts_with("document 1: not YAML"), "{e}");
        let e = transform("just: a map\n", &InjectOptions::default()).unwrap_err();
        assert!(e.contains("not a Kubernetes object"), "{e}");
        let e = transform(&"x".repeat(MAX_INPUT + 1), &InjectOptions::default()).unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn storage_network_names_are_checked() {
        assert_eq!(
            parse_storage_network("kube-system/demo-10-30-0-0").unwrap(),
            ("kube-system".to_string(), "demo-10-30-0-0".to_string())
        );
        for bad in ["kube-system", "Kube/x", "a/-b", "/x", "a/b/c"] {
            assert!(parse_storage_network(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_im_pod_gets_the_sidecar_first_and_containers_0_is_untouched() {
        let mut pod = im_pod();
        let opts = InjectOptions {
            storage_network: Some(("kube-system".into(), "demo-10-30-0-0".into())),
            ..Default::default()
        };
        let Decision::Inject { patch, warnings } = document_patch(&pod, &opts).unwrap() else {
            panic!("not injected")
        };
        assert!(warnings.is_empty());
        let paths: Vec<&str> = patch.iter().map(|p| p["path"].as_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/spec/initContainers",
                "/spec/volumes",
                "/metadata/annotations"
            ]
        );
        let before = pod["spec"]["containers"].clone();
        apply_patch(&mut pod, &patch).unwrap();
        assert_eq!(pod["spec"]["containers"], before);
        assert_eq!(pod["spec"]["initContainers"][0]["restartPolicy"], "Always");
        assert_eq!(
            pod["metadata"]["annotations"][NETWORKS_ANNOTATION],
            r#"[{"namespace": "kube-system", "name": "demo-10-30-0-0", "interface": "lhnet1"}]"#
        );
        // Idempotent: a second pass leaves it.
        assert!(matches!(
            document_patch(&pod, &opts).unwrap(),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn the_sidecar_mounts_longhorns_tls_secret_optional_or_the_pods_own_volume() {
        // A pod without it: the volume is added, optional (the secret may not exist).
        let mut pod = im_pod();
        let opts = InjectOptions::default();
        let Decision::Inject { patch, .. } = document_patch(&pod, &opts).unwrap() else {
            panic!("not injected")
        };
        apply_patch(&mut pod, &patch).unwrap();
        let tls: Vec<&Value> = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["name"] == TLS_VOLUME)
            .collect();
        assert_eq!(
            tls,
            [&json!({"name": TLS_VOLUME, "secret": {"secretName": TLS_VOLUME, "optional": true}})]
        );
        let mounts = &pod["spec"]["initContainers"][0]["volumeMounts"];
        assert!(mounts
            .as_array()
            .unwrap()
            .contains(&json!({"name": TLS_VOLUME, "mountPath": "/tls-files", "readOnly": true})));

        // Longhorn's instance-manager pod has it already: mounted, not added twice.
        let mut pod = im_pod();
        let longhorns =
            json!({"name": TLS_VOLUME, "secret": {"secretName": TLS_VOLUME, "optional": true}});
        pod["spec"]["volumes"] = json!([longhorns.clone()]);
        let Decision::Inject { patch, .. } = document_patch(&pod, &opts).unwrap() else {
            panic!("not injected: Longhorn's own TLS volume must not block the injection")
        };
        apply_patch(&mut pod, &patch).unwrap();
        let count = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["name"] == TLS_VOLUME)
            .count();
        assert_eq!(count, 1);
        assert_eq!(pod["spec"]["volumes"][0], longhorns);
    }

    #[test]
    fn existing_arrays_are_appended_and_keys_escaped() {
        let mut pod = im_pod();
        pod["metadata"]["annotations"] = json!({"a": "b"});
        pod["spec"]["initContainers"] = json!([{"name": "other", "image": "x"}]);
        pod["spec"]["volumes"] = json!([{"name": "v", "emptyDir": {}}]);
        let opts = InjectOptions {
            mode: Mode::Capture,
            ..Default::default()
        };
        let Decision::Inject { patch, .. } = document_patch(&pod, &opts).unwrap() else {
            panic!()
        };
        let paths: Vec<&str> = patch.iter().map(|p| p["path"].as_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/spec/initContainers/0",
                "/spec/initContainers/0",
                "/spec/volumes/-",
                "/spec/volumes/-",
                "/spec/volumes/-",
                "/metadata/annotations/lhnet.io~1injected"
            ]
        );
        apply_patch(&mut pod, &patch).unwrap();
        let names: Vec<&str> = pod["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [CAPTURE_NAME, SIDECAR_NAME, "other"]);
        assert_eq!(
            pod["metadata"]["annotations"]["lhnet.io/injected"],
            "capture"
        );
    }
}
