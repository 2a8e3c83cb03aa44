//! A simulated Longhorn instance-manager: `ProcessManagerService` (8500) and the v1-process part
//! of `imrpc.InstanceService` (8503) over one process table, starting real processes from the
//! binary and args a manager gives, as longhorn-instance-manager does: ports allocated from a
//! range, `port_args` appended (`--listen,0.0.0.0:` + port, split at commas), the process's
//! output kept as its log, its state followed (starting → running once its first port answers;
//! stopped after a delete; error when it exits by itself), every change sent to watchers.
//!
//! Longhorn's engine binary cannot be built here: a spec whose binary is named `longhorn` runs
//! `lhnet-loadtest longhorn <args>` instead (the simulated engine or replica, [`run_longhorn`]);
//! any other binary is started as it is.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use lhnet_proto::imrpc::instance_service_server::{InstanceService, InstanceServiceServer};
use lhnet_proto::imrpc::{
    InstanceCreateRequest, InstanceDeleteRequest, InstanceDeleteTargetRequest, InstanceGetRequest,
    InstanceListResponse, InstanceLogRequest, InstanceReplaceRequest, InstanceResponse,
    InstanceResumeRequest, InstanceSpec, InstanceStatus, InstanceSuspendRequest,
    InstanceSwitchOverTargetRequest, LogGetFlagsRequest, LogGetFlagsResponse, LogGetLevelRequest,
    LogGetLevelResponse, LogSetFlagsRequest, LogSetLevelRequest, ProcessInstanceSpec,
};
use lhnet_proto::process_manager::process_manager_service_server::{
    ProcessManagerService, ProcessManagerServiceServer,
};
use lhnet_proto::process_manager::{
    LogRequest, LogResponse, ProcessCreateRequest, ProcessDeleteRequest, ProcessGetRequest,
    ProcessListRequest, ProcessListResponse, ProcessReplaceRequest, ProcessResponse, ProcessSpec,
    ProcessStatus, VersionResponse,
};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// The instance-manager API version this one speaks (InstanceService exists from 4 on); its
/// proxy API version is 0: it has no proxy of its own (lhnet's VersionGet patch advertises
/// lhnet's).
pub const API_VERSION: i64 = 4;

/// Lines of output kept per process.
const LOG_LINES: usize = 2000;

/// How a process spec's binary is run.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The program that stands for Longhorn's `longhorn` binary, and the args put first.
    pub longhorn: (PathBuf, Vec<String>),
}

#[derive(Clone)]
pub struct InstanceManager {
    inner: Arc<Inner>,
}

struct Inner {
    binaries: Binaries,
    table: Mutex<Table>,
    updates: broadcast::Sender<ProcessResponse>,
}

struct Table {
    processes: BTreeMap<String, Process>,
    ports: (u16, u16),
    used: Vec<(u16, u16)>,
}

struct Process {
    spec: ProcessSpec,
    status: ProcessStatus,
    /// `engine` or `replica` when created through InstanceService.
    kind: String,
    volume: String,
    log: Arc<Mutex<VecDeque<String>>>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    deleting: bool,
}

impl InstanceManager {
    pub fn new(binaries: Binaries, ports: (u16, u16)) -> InstanceManager {
        InstanceManager {
            inner: Arc::new(Inner {
                binaries,
                table: Mutex::new(Table {
                    processes: BTreeMap::new(),
                    ports,
                    used: Vec::new(),
                }),
                updates: broadcast::channel(256).0,
            }),
        }
    }

    /// Serves ProcessManagerService (and health) on `pm`, InstanceService on `instance`.
    pub async fn serve(
        self,
        pm: tokio::net::TcpListener,
        instance: tokio::net::TcpListener,
    ) -> Result<(), tonic::transport::Error> {
        let health = lhnet_proto::health::health_server::HealthServer::new(Serving);
        let a = tonic::transport::Server::builder()
            .add_service(ProcessManagerServiceServer::new(self.clone()))
            .add_service(health.clone())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(pm));
        let b = tonic::transport::Server::builder()
            .add_service(InstanceServiceServer::new(self))
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(instance));
        tokio::try_join!(a, b).map(drop)
    }

    /// The answer for one process, as it is now.
    fn response(&self, name: &str) -> Option<ProcessResponse> {
        let table = self.inner.table.lock();
        table.processes.get(name).map(|p| ProcessResponse {
            spec: Some(p.spec.clone()),
            status: Some(p.status.clone()),
            deleted: false,
        })
    }

    fn changed(&self, name: &str) {
        if let Some(r) = self.response(name) {
            let _ = self.inner.updates.send(r);
        }
    }

    /// Registers and starts a process: its ports, its args with the port args, its child.
    fn create(
        &self,
        spec: ProcessSpec,
        kind: &str,
        volume: &str,
    ) -> Result<ProcessResponse, Status> {
        if spec.name.is_empty() || spec.binary.is_empty() {
            return Err(Status::invalid_argument("missing required argument"));
        }
        let count = u16::try_from(spec.port_count.max(0))
            .map_err(|_| Status::invalid_argument("port_count too large"))?;
        if spec.port_args.len() > usize::from(count) {
            return Err(Status::invalid_argument(format!(
                "too many port args {:?} for port count {count}",
                spec.port_args
            )));
        }
        let mut table = self.inner.table.lock();
        if table.processes.contains_key(&spec.name) {
            return Err(Status::already_exists(format!(
                "engine process {} already exists",
                spec.name
            )));
        }
        let (start, end) = table.allocate(count).ok_or_else(|| {
            Status::resource_exhausted(format!("cannot allocate {count} ports for {}", spec.name))
        })?;
        let mut spec = spec;
        for (i, arg) in spec.port_args.clone().iter().enumerate() {
            let port = start + i as u16;
            spec.args
                .extend(format!("{arg}{port}").split(',').map(String::from));
        }
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (kill, killed) = tokio::sync::oneshot::channel();
        let status = ProcessStatus {
            state: "starting".into(),
            error_msg: String::new(),
            port_start: i32::from(start),
            port_end: i32::from(end),
            conditions: Default::default(),
            uuid: uuid(),
        };
        let name = spec.name.clone();
        let child = self.spawn(&spec, &log);
        let mut process = Process {
            spec,
            status,
            kind: kind.into(),
            volume: volume.into(),
            log: log.clone(),
            kill: Some(kill),
            deleting: false,
        };
        match child {
            Ok(child) => {
                let this = self.clone();
                let first_port = (count > 0).then_some(start);
                tokio::spawn(this.follow(name.clone(), child, killed, first_port));
            }
            Err(e) => {
                process.status.state = "error".into();
                process.status.error_msg = e;
                process.kill = None;
            }
        }
        let response = ProcessResponse {
            spec: Some(process.spec.clone()),
            status: Some(process.status.clone()),
            deleted: false,
        };
        table.processes.insert(name, process);
        drop(table);
        let _ = self.inner.updates.send(response.clone());
        Ok(response)
    }

    fn spawn(
        &self,
        spec: &ProcessSpec,
        log: &Arc<Mutex<VecDeque<String>>>,
    ) -> Result<tokio::process::Child, String> {
        let binary = PathBuf::from(&spec.binary);
        let mut command = if binary.file_name().is_some_and(|n| n == "longhorn") {
            let (program, first) = &self.inner.binaries.longhorn;
            let mut c = tokio::process::Command::new(program);
            c.args(first);
            c
        } else {
            tokio::process::Command::new(&binary)
        };
        command
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", spec.binary))?;
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut log = log.lock();
                    if log.len() == LOG_LINES {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        Ok(child)
    }

    /// Follows a child: running once its first port answers, stopped or error when it ends.
    async fn follow(
        self,
        name: String,
        mut child: tokio::process::Child,
        killed: tokio::sync::oneshot::Receiver<()>,
        first_port: Option<u16>,
    ) {
        let ready = async {
            let Some(port) = first_port else {
                return;
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let mut killed = std::pin::pin!(killed);
        let mut ready = std::pin::pin!(ready);
        let mut is_ready = false;
        let exit = loop {
            tokio::select! {
                exit = child.wait() => break exit,
                () = &mut ready, if !is_ready => {
                    is_ready = true;
                    self.set_state(&name, "running", "");
                }
                _ = &mut killed => {
                    let _ = child.start_kill();
                    break child.wait().await;
                }
            }
        };
        let (state, error) = {
            let table = self.inner.table.lock();
            match table.processes.get(&name) {
                Some(p) if p.deleting => ("stopped", String::new()),
                _ => (
                    "error",
                    match exit {
                        Ok(status) => format!("process exited: {status}"),
                        Err(e) => format!("process lost: {e}"),
                    },
                ),
            }
        };
        self.set_state(&name, state, &error);
        let deleting = self
            .inner
            .table
            .lock()
            .processes
            .get(&name)
            .is_some_and(|p| p.deleting);
        if deleting {
            let mut table = self.inner.table.lock();
            if let Some(p) = table.processes.remove(&name) {
                table.release(p.status.port_start as u16);
                let _ = self.inner.updates.send(ProcessResponse {
                    spec: Some(p.spec),
                    status: Some(p.status),
                    deleted: true,
                });
            }
        }
    }

    fn set_state(&self, name: &str, state: &str, error: &str) {
        {
            let mut table = self.inner.table.lock();
            let Some(p) = table.processes.get_mut(name) else {
                return;
            };
            p.status.state = state.into();
            p.status.error_msg = error.into();
        }
        self.changed(name);
    }

    fn delete(&self, name: &str) -> Result<ProcessResponse, Status> {
        let mut table = self.inner.table.lock();
        let Some(p) = table.processes.get_mut(name) else {
            return Err(Status::not_found(format!("cannot find process {name}")));
        };
        p.deleting = true;
        let response = ProcessResponse {
            spec: Some(p.spec.clone()),
            status: Some(ProcessStatus {
                state: "stopping".into(),
                ..p.status.clone()
            }),
            deleted: true,
        };
        match p.kill.take() {
            Some(kill) => {
                let _ = kill.send(());
            }
            // Never started (its binary failed): nothing runs, gone at once.
            None => {
                if let Some(p) = table.processes.remove(name) {
                    table.release(p.status.port_start as u16);
                }
            }
        }
        Ok(response)
    }

    fn get(&self, name: &str) -> Result<ProcessResponse, Status> {
        self.response(name)
            .ok_or_else(|| Status::not_found(format!("cannot find process {name}")))
    }

    fn list(&self) -> BTreeMap<String, ProcessResponse> {
        let names: Vec<String> = self.inner.table.lock().processes.keys().cloned().collect();
        names
            .into_iter()
            .filter_map(|n| self.response(&n).map(|r| (n, r)))
            .collect()
    }

    fn log(&self, name: &str) -> Result<Vec<String>, Status> {
        let table = self.inner.table.lock();
        let p = table
            .processes
            .get(name)
            .ok_or_else(|| Status::not_found(format!("cannot find process {name}")))?;
        let lines = p.log.lock().iter().cloned().collect();
        Ok(lines)
    }

    /// Starts the new spec under the same name, then stops the old process.
    fn replace(&self, spec: ProcessSpec) -> Result<ProcessResponse, Status> {
        let (kind, volume) = {
            let table = self.inner.table.lock();
            let old = table.processes.get(&spec.name).ok_or_else(|| {
                Status::not_found(format!("existing process {} doesn't exists", spec.name))
            })?;
            (old.kind.clone(), old.volume.clone())
        };
        let old = {
            let mut table = self.inner.table.lock();
            table.processes.remove(&spec.name)
        };
        let created = self.create(spec, &kind, &volume);
        if let Some(mut old) = old {
            if let Some(kill) = old.kill.take() {
                let _ = kill.send(());
            }
            self.inner
                .table
                .lock()
                .release(old.status.port_start as u16);
        }
        created
    }
}

impl Table {
    fn allocate(&mut self, count: u16) -> Option<(u16, u16)> {
        if count == 0 {
            return Some((0, 0));
        }
        let (low, high) = self.ports;
        let mut start = low;
        while u32::from(start) + u32::from(count) - 1 <= u32::from(high) {
            let end = start + count - 1;
            match self.used.iter().find(|(s, e)| *s <= end && start <= *e) {
                Some((_, e)) => start = e.checked_add(1)?,
                None => {
                    self.used.push((start, end));
                    return Some((start, end));
                }
            }
        }
        None
    }

    fn release(&mut self, start: u16) {
        self.used.retain(|(s, _)| *s != start);
    }
}

fn uuid() -> String {
    lhnet_sim::uuid()
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn lines_stream(lines: Vec<String>) -> Stream_<LogResponse> {
    Box::pin(tokio_stream::iter(
        lines.into_iter().map(|line| Ok(LogResponse { line })),
    ))
}

fn version() -> VersionResponse {
    VersionResponse {
        version: "lhnet-sim-instance-manager".into(),
        git_commit: String::new(),
        build_date: String::new(),
        instance_manager_api_version: API_VERSION,
        instance_manager_api_min_version: 1,
        instance_manager_proxy_api_version: 0,
        instance_manager_proxy_api_min_version: 0,
    }
}

#[tonic::async_trait]
impl ProcessManagerService for InstanceManager {
    async fn process_create(
        &self,
        request: Request<ProcessCreateRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("missing required argument spec"))?;
        self.create(spec, "", "").map(Response::new)
    }

    async fn process_delete(
        &self,
        request: Request<ProcessDeleteRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        self.delete(&request.into_inner().name).map(Response::new)
    }

    async fn process_get(
        &self,
        request: Request<ProcessGetRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        self.get(&request.into_inner().name).map(Response::new)
    }

    async fn process_list(
        &self,
        _: Request<ProcessListRequest>,
    ) -> Result<Response<ProcessListResponse>, Status> {
        Ok(Response::new(ProcessListResponse {
            processes: self.list().into_iter().collect(),
        }))
    }

    type ProcessLogStream = Stream_<LogResponse>;

    async fn process_log(
        &self,
        request: Request<LogRequest>,
    ) -> Result<Response<Self::ProcessLogStream>, Status> {
        let lines = self.log(&request.into_inner().name)?;
        Ok(Response::new(lines_stream(lines)))
    }

    type ProcessWatchStream = Stream_<ProcessResponse>;

    async fn process_watch(
        &self,
        _: Request<()>,
    ) -> Result<Response<Self::ProcessWatchStream>, Status> {
        let updates = tokio_stream::wrappers::BroadcastStream::new(self.inner.updates.subscribe())
            .filter_map(|u| u.ok().map(Ok));
        Ok(Response::new(Box::pin(updates)))
    }

    async fn process_replace(
        &self,
        request: Request<ProcessReplaceRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("missing required argument spec"))?;
        self.replace(spec).map(Response::new)
    }

    async fn version_get(&self, _: Request<()>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(version()))
    }
}

/// An InstanceService answer from a process's.
fn instance(p: ProcessResponse, kind: &str, volume: &str) -> InstanceResponse {
    let spec = p.spec.unwrap_or_default();
    let status = p.status.unwrap_or_default();
    InstanceResponse {
        spec: Some(InstanceSpec {
            name: spec.name,
            r#type: kind.into(),
            volume_name: volume.into(),
            port_count: spec.port_count,
            port_args: spec.port_args,
            process_instance_spec: Some(ProcessInstanceSpec {
                binary: spec.binary,
                args: spec.args,
            }),
            ..Default::default()
        }),
        status: Some(InstanceStatus {
            state: status.state,
            error_msg: status.error_msg,
            port_start: status.port_start,
            port_end: status.port_end,
            conditions: status.conditions,
            uuid: status.uuid,
            ..Default::default()
        }),
        deleted: p.deleted,
    }
}

impl InstanceManager {
    fn kind_of(&self, name: &str) -> (String, String) {
        let table = self.inner.table.lock();
        table
            .processes
            .get(name)
            .map(|p| (p.kind.clone(), p.volume.clone()))
            .unwrap_or_default()
    }

    fn v1_only(data_engine: i32) -> Result<(), Status> {
        match data_engine {
            0 => Ok(()),
            other => Err(Status::unimplemented(format!(
                "data engine {other}: this simulated instance-manager runs v1 processes only"
            ))),
        }
    }

    fn spec_of(spec: InstanceSpec) -> Result<(ProcessSpec, String, String), Status> {
        Self::v1_only(spec.data_engine)?;
        let process = spec.process_instance_spec.ok_or_else(|| {
            Status::invalid_argument("missing required argument process_instance_spec")
        })?;
        Ok((
            ProcessSpec {
                name: spec.name,
                binary: process.binary,
                args: process.args,
                port_count: spec.port_count,
                port_args: spec.port_args,
            },
            spec.r#type,
            spec.volume_name,
        ))
    }
}

#[tonic::async_trait]
impl InstanceService for InstanceManager {
    async fn instance_create(
        &self,
        request: Request<InstanceCreateRequest>,
    ) -> Result<Response<InstanceResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("missing required argument spec"))?;
        let (process, kind, volume) = Self::spec_of(spec)?;
        let created = self.create(process, &kind, &volume)?;
        Ok(Response::new(instance(created, &kind, &volume)))
    }

    async fn instance_delete(
        &self,
        request: Request<InstanceDeleteRequest>,
    ) -> Result<Response<InstanceResponse>, Status> {
        let request = request.into_inner();
        Self::v1_only(request.data_engine)?;
        let (kind, volume) = self.kind_of(&request.name);
        let deleted = self.delete(&request.name)?;
        Ok(Response::new(instance(deleted, &kind, &volume)))
    }

    async fn instance_get(
        &self,
        request: Request<InstanceGetRequest>,
    ) -> Result<Response<InstanceResponse>, Status> {
        let request = request.into_inner();
        Self::v1_only(request.data_engine)?;
        let (kind, volume) = self.kind_of(&request.name);
        Ok(Response::new(instance(
            self.get(&request.name)?,
            &kind,
            &volume,
        )))
    }

    async fn instance_list(
        &self,
        _: Request<()>,
    ) -> Result<Response<InstanceListResponse>, Status> {
        let instances = self
            .list()
            .into_iter()
            .map(|(name, p)| {
                let (kind, volume) = self.kind_of(&name);
                (name, instance(p, &kind, &volume))
            })
            .collect();
        Ok(Response::new(InstanceListResponse { instances }))
    }

    async fn instance_replace(
        &self,
        request: Request<InstanceReplaceRequest>,
    ) -> Result<Response<InstanceResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("missing required argument spec"))?;
        let (process, kind, volume) = Self::spec_of(spec)?;
        Ok(Response::new(instance(
            self.replace(process)?,
            &kind,
            &volume,
        )))
    }

    type InstanceLogStream = Stream_<LogResponse>;

    async fn instance_log(
        &self,
        request: Request<InstanceLogRequest>,
    ) -> Result<Response<Self::InstanceLogStream>, Status> {
        let request = request.into_inner();
        Self::v1_only(request.data_engine)?;
        Ok(Response::new(lines_stream(self.log(&request.name)?)))
    }

    type InstanceWatchStream = Stream_<()>;

    /// A message per change (InstanceService's watch carries no instance).
    async fn instance_watch(
        &self,
        _: Request<()>,
    ) -> Result<Response<Self::InstanceWatchStream>, Status> {
        let updates = tokio_stream::wrappers::BroadcastStream::new(self.inner.updates.subscribe())
            .filter_map(|u| u.ok().map(|_| Ok(())));
        Ok(Response::new(Box::pin(updates)))
    }

    async fn instance_suspend(
        &self,
        _: Request<InstanceSuspendRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("suspend is for v2 instances"))
    }

    async fn instance_resume(
        &self,
        _: Request<InstanceResumeRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("resume is for v2 instances"))
    }

    async fn instance_switch_over_target(
        &self,
        _: Request<InstanceSwitchOverTargetRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented(
            "target switch-over is for v2 instances",
        ))
    }

    async fn instance_delete_target(
        &self,
        _: Request<InstanceDeleteTargetRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("targets are for v2 instances"))
    }

    async fn log_set_level(&self, _: Request<LogSetLevelRequest>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }

    async fn log_set_flags(&self, _: Request<LogSetFlagsRequest>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }

    async fn log_get_level(
        &self,
        _: Request<LogGetLevelRequest>,
    ) -> Result<Response<LogGetLevelResponse>, Status> {
        Ok(Response::new(LogGetLevelResponse {
            level: "info".into(),
        }))
    }

    async fn log_get_flags(
        &self,
        _: Request<LogGetFlagsRequest>,
    ) -> Result<Response<LogGetFlagsResponse>, Status> {
        Ok(Response::new(LogGetFlagsResponse::default()))
    }

    async fn version_get(&self, _: Request<()>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(version()))
    }
}

/// `grpc.health.v1.Health`: SERVING, for any service name (the manager checks it first).
#[derive(Clone)]
struct Serving;

#[tonic::async_trait]
impl lhnet_proto::health::health_server::Health for Serving {
    async fn check(
        &self,
        _: Request<lhnet_proto::health::HealthCheckRequest>,
    ) -> Result<Response<lhnet_proto::health::HealthCheckResponse>, Status> {
        Ok(Response::new(lhnet_proto::health::HealthCheckResponse {
            status: 1,
        }))
    }

    type WatchStream = Stream_<lhnet_proto::health::HealthCheckResponse>;

    async fn watch(
        &self,
        _: Request<lhnet_proto::health::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

/// `lhnet-loadtest longhorn controller VOLUME … | replica DIR …`: the simulated engine or
/// replica, started from Longhorn's own argument shape (what an instance-manager runs):
/// `controller VOLUME --listen IP:PORT --replica tcp://IP:PORT … --size N
/// [--engine-instance-name N] [--frontend-listen IP:PORT]`, `replica DIR --listen IP:PORT
/// --size N [--volume-name V] [--replica-instance-name R]`. `--frontend-listen` is the
/// simulator's own: where its block device (a dataconn socket) answers. Runs until it is
/// killed, or its instance-manager is gone.
pub async fn run_longhorn(args: &[String]) -> Result<(), String> {
    // Gone with the instance-manager that started it, however that one ended (a real IM's
    // processes die with its container).
    let parent = nix::unistd::getppid();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if nix::unistd::getppid() != parent {
                // Not eprintln!: its stderr was the instance-manager's pipe, closed now.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "longhorn: the instance-manager that started this process is gone; exiting"
                );
                std::process::exit(1);
            }
        }
    });
    let (command, rest) = args
        .split_first()
        .ok_or("longhorn: a command is needed: controller or replica")?;
    let (positional, flags) = parse_flags(rest)?;
    let one = |name: &str| {
        flags
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let listen: SocketAddr = one("listen")
        .ok_or("longhorn: --listen IP:PORT is required")?
        .parse()
        .map_err(|e| format!("longhorn: --listen: {e}"))?;
    let size = match one("size") {
        Some(s) => crate::parse_size(&s).map_err(|e| format!("longhorn: --size: {e}"))?,
        None => 64 << 20,
    };
    match command.as_str() {
        "controller" => {
            let volume = positional
                .first()
                .ok_or("longhorn controller: the volume name is required")?;
            let replicas = flags
                .iter()
                .filter(|(k, _)| k == "replica")
                .map(|(_, v)| v.clone())
                .collect();
            let spec = lhnet_sim::EngineSpec {
                volume: volume.clone(),
                instance: one("engine-instance-name").unwrap_or_default(),
                size,
                replicas,
                ..Default::default()
            };
            let engine = lhnet_sim::start_engine_with(listen, spec)
                .await
                .map_err(|e| format!("longhorn controller: {e}"))?;
            tell(&format!(
                "engine {volume} listening on {}",
                engine.served.addr
            ));
            // The simulator's block device: a dataconn socket (the real engine's is tgt's).
            let _frontend = match one("frontend-listen") {
                Some(at) => {
                    let at: SocketAddr = at
                        .parse()
                        .map_err(|e| format!("longhorn: --frontend-listen: {e}"))?;
                    let served = lhnet_sim::start_frontend(at, &engine.engine)
                        .await
                        .map_err(|e| format!("longhorn controller: frontend {at}: {e}"))?;
                    Some(served)
                }
                None => None,
            };
            std::future::pending::<()>().await;
            Ok(())
        }
        "replica" => {
            let spec = lhnet_sim::ReplicaSpec {
                volume: one("volume-name").unwrap_or_default(),
                instance: one("replica-instance-name").unwrap_or_default(),
                size,
                ..Default::default()
            };
            let replica = lhnet_sim::start_replica_with(listen, spec)
                .await
                .map_err(|e| format!("longhorn replica: {e}"))?;
            tell(&format!("replica {} listening", replica.url()));
            std::future::pending::<()>().await;
            Ok(())
        }
        other => Err(format!(
            "longhorn: unknown command {other:?}; use controller or replica"
        )),
    }
}

/// A line on stdout that cannot fail the process (stdout is the instance-manager's pipe).
fn tell(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Flags that take no value.
const SWITCHES: &[&str] = &[
    "upgrade",
    "disable-revision-counter",
    "salvage-requested",
    "unmap-mark-snap-chain-removed",
    "debug",
];

/// Flags in the order given: (name, value).
type Flags = Vec<(String, String)>;

/// `--name value`, `--name=value` and the switches; the rest positional.
fn parse_flags(args: &[String]) -> Result<(Vec<String>, Flags), String> {
    let mut positional = Vec::new();
    let mut flags = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            positional.push(arg.clone());
            continue;
        };
        if let Some((k, v)) = flag.split_once('=') {
            flags.push((k.to_string(), v.to_string()));
        } else if SWITCHES.contains(&flag) {
            flags.push((flag.to_string(), "true".into()));
        } else {
            let value = it
                .next()
                .ok_or_else(|| format!("longhorn: flag --{flag} needs a value"))?;
            flags.push((flag.to_string(), value.clone()));
        }
    }
    Ok((positional, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_allocated_without_overlap_and_given_back() {
        let mut t = Table {
            processes: BTreeMap::new(),
            ports: (10000, 10029),
            used: Vec::new(),
        };
        assert_eq!(t.allocate(15), Some((10000, 10014)));
        assert_eq!(t.allocate(1), Some((10015, 10015)));
        assert_eq!(t.allocate(15), None);
        t.release(10000);
        assert_eq!(t.allocate(10), Some((10000, 10009)));
        assert_eq!(t.allocate(0), Some((0, 0)));
    }

    #[test]
    fn longhorn_args_parse_as_the_engine_binary_takes_them() {
        let args: Vec<String> = [
            "vol",
            "--frontend",
            "tgt-blockdev",
            "--upgrade",
            "--replica",
            "tcp://10.30.0.3:10000",
            "--replica=tcp://10.30.0.4:10000",
            "--listen",
            "0.0.0.0:10100",
        ]
        .map(String::from)
        .into();
        let (positional, flags) = parse_flags(&args).unwrap();
        assert_eq!(positional, ["vol"]);
        let replicas: Vec<&str> = flags
            .iter()
            .filter(|(k, _)| k == "replica")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(replicas, ["tcp://10.30.0.3:10000", "tcp://10.30.0.4:10000"]);
        assert!(flags.contains(&("upgrade".into(), "true".into())));
        assert!(parse_flags(&["--size".to_string()]).is_err());
    }
}
