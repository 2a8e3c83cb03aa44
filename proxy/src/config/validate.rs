//! Checks that span sections: names and references, and the addresses listeners and clusters
//! may use.

use super::parse::Cx;
use super::*;

pub(super) fn check_references(
    listeners: &[ListenerConfig],
    clusters: &[ClusterConfig],
    cx: &mut Cx,
) {
    let mut seen = HashSet::new();
    for c in clusters {
        if !seen.insert(c.name.as_str()) {
            cx.err(
                &format!("{}.name", c.path),
                format!("duplicate cluster name \"{}\"", c.name),
            );
        }
    }
    let mut seen_listeners = HashSet::new();
    for l in listeners {
        if !seen_listeners.insert(l.name.as_str()) {
            cx.err(
                &format!("{}.name", l.path),
                format!("duplicate listener name \"{}\"", l.name),
            );
        }
        if let Some(name) = &l.cluster {
            let path = format!("{}.cluster", l.path);
            match clusters.iter().find(|c| &c.name == name) {
                None if name == LOOPBACK_CLUSTER => {
                    if l.address.fixed_ip().is_some_and(|ip| ip.is_loopback()) {
                        cx.err(
                            &format!("{}.address", l.path),
                            "a loopback address forwarded to cluster loopback would connect to itself",
                        );
                    }
                }
                None => {
                    let known: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
                    cx.err(
                        &path,
                        format!("no cluster named \"{name}\" (clusters: {known:?}; \"{LOOPBACK_CLUSTER}\" is built in)"),
                    )
                }
                Some(c) if c.kind == ClusterKind::OriginalDst => cx.err(
                    &path,
                    format!("cluster \"{name}\" is original_dst; a tcp listener needs loopback or a static cluster"),
                ),
                Some(_) => {}
            }
        }
        for r in &l.routes {
            if r.action == RouteAction::Local(LocalService::LonghornEngineProxy) {
                let name = r.upstream_cluster.as_deref().unwrap_or("engines");
                let path = format!("{}.upstream_cluster", r.path);
                match clusters.iter().find(|c| c.name == name) {
                    None => cx.err(
                        &path,
                        format!("longhorn_engine_proxy dials through cluster \"{name}\", which does not exist; add an original_dst cluster named {name}"),
                    ),
                    Some(c) if c.kind != ClusterKind::OriginalDst => cx.err(
                        &path,
                        format!("cluster \"{name}\" must be type: original_dst for longhorn_engine_proxy"),
                    ),
                    Some(_) => {}
                }
            }
            if r.upstream_cluster.is_some()
                && r.action != RouteAction::Local(LocalService::LonghornEngineProxy)
            {
                cx.err(
                    &format!("{}.upstream_cluster", r.path),
                    "only local: longhorn_engine_proxy routes take upstream_cluster",
                );
            }
            if let Some(name) = &r.backup_egress {
                let path = format!("{}.backup_egress", r.path);
                if r.action != RouteAction::Local(LocalService::LonghornEngineProxy) {
                    cx.err(
                        &path,
                        "only local: longhorn_engine_proxy routes take backup_egress",
                    );
                }
                match listeners.iter().find(|l| &l.name == name) {
                    Some(l) if l.kind == ListenerKind::HttpConnect => {}
                    Some(_) => cx.err(
                        &path,
                        format!("listener \"{name}\" is not kind: http_connect"),
                    ),
                    None => cx.err(
                        &path,
                        format!("no listener named \"{name}\"; backup_egress names a kind: http_connect listener"),
                    ),
                }
            }
            if let Some(name) = &r.passthrough_cluster {
                let path = format!("{}.passthrough_cluster", r.path);
                if r.action != RouteAction::Local(LocalService::LonghornEngineProxy) {
                    cx.err(
                        &path,
                        "only local: longhorn_engine_proxy routes take passthrough_cluster",
                    );
                }
                match clusters.iter().find(|c| &c.name == name) {
                    None => {
                        let known: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
                        cx.err(
                            &path,
                            format!("no cluster named \"{name}\" (clusters: {known:?}); the instance-manager's own proxy is a static cluster at 127.0.0.1:8501"),
                        )
                    }
                    Some(c) if c.kind == ClusterKind::OriginalDst => cx.err(
                        &path,
                        format!("cluster \"{name}\" is original_dst; passthrough needs a static cluster (the instance-manager's proxy, 127.0.0.1:8501)"),
                    ),
                    Some(_) => {}
                }
            }
            let RouteAction::Cluster(name) = &r.action else {
                continue;
            };
            let path = format!("{}.cluster", r.path);
            match clusters.iter().find(|c| &c.name == name) {
                None => {
                    let known: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
                    cx.err(&path, format!("no cluster named \"{name}\" (clusters: {known:?})"))
                }
                Some(c) if c.kind == ClusterKind::OriginalDst => cx.err(
                    &path,
                    format!(
                        "cluster \"{name}\" is original_dst; its destinations come from local services \
                         (longhorn_engine_proxy), so a route cannot forward to it"
                    ),
                ),
                Some(_) => {}
            }
        }
    }
}

/// Whether two binds could take the same socket: their ports meet and their IPs may be one
/// (equal, either the wildcard of the other's family, or both the storage address). A storage
/// address against a fixed one cannot be judged before the storage address is known.
pub(super) fn binds_meet(a: &ListenAddress, b: &ListenAddress) -> bool {
    let (pa, pb) = (a.ports(), b.ports());
    // Port 0 is a fresh port from the kernel each time: it never collides.
    let ephemeral = |p: &RangeInclusive<u16>| *p == (0..=0);
    if ephemeral(&pa) || ephemeral(&pb) || pa.start() > pb.end() || pb.start() > pa.end() {
        return false;
    }
    match (a.fixed_ip(), b.fixed_ip()) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            x == y
                || (x.is_unspecified() && x.is_ipv4() == y.is_ipv4())
                || (y.is_unspecified() && x.is_ipv4() == y.is_ipv4())
        }
        (Some(x), None) | (None, Some(x)) => x.is_unspecified(),
    }
}

/// Listeners may not share a socket with each other or with the admin server, and nothing
/// lhnet forwards raw bytes for may reach the admin port: `POST /shutdown` trusts loopback
/// peers, and a forward through lhnet arrives from loopback.
pub(super) fn check_addresses(
    admin: &AdminConfig,
    listeners: &[ListenerConfig],
    clusters: &[ClusterConfig],
    cx: &mut Cx,
) {
    let admin_bind = ListenAddress::Socket(admin.address);
    let admin_local = admin.address.ip().is_loopback() || admin.address.ip().is_unspecified();
    for (i, l) in listeners.iter().enumerate() {
        let path = format!("{}.address", l.path);
        if admin.address.port() != 0 && binds_meet(&l.address, &admin_bind) {
            cx.err(
                &path,
                format!(
                    "{} overlaps the admin address {}; give the listener another port",
                    l.address, admin.address
                ),
            );
        }
        for other in &listeners[..i] {
            if binds_meet(&l.address, &other.address) {
                cx.err(
                    &path,
                    format!(
                        "{} overlaps listener \"{}\" ({}: {}); two listeners cannot share a socket",
                        l.address, other.name, other.path, other.address
                    ),
                );
            }
        }
        if l.kind != ListenerKind::Tcp || !admin_local {
            continue;
        }
        match l.cluster.as_deref() {
            Some(LOOPBACK_CLUSTER) if l.address.ports().contains(&admin.address.port()) => cx.err(
                &path,
                format!(
                    "ports {} cover the admin port {}: cluster loopback would forward callers to the admin server (POST /shutdown); leave that port out",
                    l.address, admin.address.port()
                ),
            ),
            Some(name) => {
                let reaches_admin = clusters.iter().find(|c| c.name == name).is_some_and(|c| {
                    c.endpoints.iter().any(|e| {
                        e.port() == admin.address.port()
                            && (e.ip() == admin.address.ip()
                                || (admin.address.ip().is_unspecified() && e.ip().is_loopback()))
                    })
                });
                if reaches_admin {
                    cx.err(
                        &format!("{}.cluster", l.path),
                        format!("cluster \"{name}\" has the admin address {} as an endpoint; a tcp listener would forward callers to the admin server (POST /shutdown)", admin.address),
                    );
                }
            }
            None => {}
        }
    }
}
