//! A real Kubernetes control plane on 127.0.0.1 for the cluster tests: etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler (pointed at the
//! extender through deploy/'s KubeSchedulerConfiguration), what deploy/
//! renders applied to it, and lvmlocal's cluster components with the CSI
//! sidecars as host processes, each with its own ServiceAccount's token so
//! deploy/'s RBAC is what they run under. Agents run in VMs (see `NodeVm`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::guest::workspace_binary;
use crate::process::{Service, free_port, wait_for};
use crate::vm::{HOST_FROM_GUEST, RunningVm, Vm};

pub const NAMESPACE: &str = "lvmlocal";
/// The Helm release of [`Options::helm`].
pub const RELEASE: &str = "lvmlocal";
pub const DRIVER: &str = "lvmlocal.io";
pub const TOPOLOGY_KEY: &str = "lvmlocal.io/node";
/// The node label that lets the agent claim the node's disks.
pub const CLAIM_LABEL: &str = "lvmlocal.io/claim-disks";
/// The port at which a node VM reaches the API server.
const GUEST_API_PORT: u16 = 6443;
const ADMIN_TOKEN: &str = "lvmlocal-test-admin";
/// Kinds of deploy/ applied as they are. Workloads are not: their processes
/// run on the host (or in a VM) instead, with the same arguments.
const APPLIED_KINDS: &[&str] = &[
    "Namespace",
    "CustomResourceDefinition",
    "CSIDriver",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "StorageClass",
    "VolumeSnapshotClass",
];

/// `<workspace>/target/components/bin` (scripts/components.sh) unless
/// `LVMLOCAL_COMPONENTS_DIR` says otherwise.
pub fn component(name: &str) -> PathBuf {
    let dir = match std::env::var_os("LVMLOCAL_COMPONENTS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/components/bin"),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: scripts/components.sh builds it",
        path.display()
    );
    path
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

/// What the harness starts besides the control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// csi-scheduler's --default-placement.
    pub placement: &'static str,
    /// csi-controller's --volume-wait-seconds.
    pub volume_wait_secs: u64,
    /// csi-controller's --unclaimed-grace-seconds; None: deploy's.
    pub unclaimed_grace_secs: Option<u64>,
    /// Install with `helm install` of the chart (every object of it, its
    /// workloads included, which no kubelet runs here) instead of applying
    /// the kustomize base's objects; the components run with the chart's
    /// arguments either way.
    pub helm: bool,
    /// Install `deploy/overlays/snapshots` with the external-snapshotter's
    /// CRDs, and run its snapshot-controller and csi-snapshotter.
    pub snapshots: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            placement: "binpack",
            volume_wait_secs: 20,
            unclaimed_grace_secs: None,
            helm: false,
            snapshots: false,
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub api_port: u16,
    pub extender_port: u16,
    pub controller_metrics_port: u16,
    options: Options,
    etcd_port: u16,
    services: BTreeMap<&'static str, Service>,
    deploy: Vec<Value>,
    tokens: BTreeMap<String, String>,
}

impl Cluster {
    /// Starts everything and returns once the API server answers, deploy/
    /// is applied and lvmlocal's components are running.
    pub fn start(options: Options) -> anyhow::Result<Self> {
        let deploy = if options.helm {
            crate::manifests::helm_template(&[])
        } else if options.snapshots {
            crate::manifests::render("deploy/overlays/snapshots")
        } else {
            crate::manifests::render("deploy")
        };
        let dir = tempfile::Builder::new()
            .prefix("lvmlocal-cluster-")
            .tempdir()?;
        let mut cluster = Self {
            api_port: free_port(),
            extender_port: free_port(),
            controller_metrics_port: free_port(),
            etcd_port: free_port(),
            dir,
            options,
            services: BTreeMap::new(),
            deploy,
            tokens: BTreeMap::new(),
        };
        fs::create_dir_all(cluster.logs())?;
        cluster.make_pki()?;
        cluster.start_etcd()?;
        cluster.start_apiserver()?;
        cluster.write_kubeconfig("admin", &cluster.local_api(), ADMIN_TOKEN)?;
        cluster.start_kube_controller_manager()?;
        if cluster.options.snapshots {
            cluster.apply_snapshot_crds()?;
        }
        cluster.apply_deploy()?;
        cluster.start_kube_scheduler()?;
        cluster.start_csi_scheduler()?;
        cluster.start_csi_controller()?;
        cluster.start_provisioner()?;
        cluster.start_resizer()?;
        if cluster.options.snapshots {
            cluster.start_snapshot_controller()?;
            cluster.start_snapshotter()?;
        }
        let socket = cluster.controller_socket();
        wait_for("csi-controller serving", Duration::from_secs(60), || {
            socket
                .exists()
                .then_some(())
                .ok_or_else(|| cluster.report())
        })?;
        Ok(cluster)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn logs(&self) -> PathBuf {
        self.path("logs")
    }

    fn local_api(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    fn spawn(&mut self, name: &'static str, command: Command) -> anyhow::Result<()> {
        let log = self.logs().join(format!("{name}.log"));
        let service = Service::start(name, command, &log)?;
        self.services.insert(name, service);
        Ok(())
    }

    pub fn service(&mut self, name: &str) -> &mut Service {
        self.services
            .get_mut(name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// SIGKILLs a component's process group and starts it again. The CSI
    /// sidecars exit when their connection to csi-controller drops, and
    /// kubelet would start them again: so does this, after csi-controller.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        self.service(name).kill();
        if name == "csi-controller" {
            self.start_csi_controller()?;
            self.restart("csi-provisioner")?;
            if self.options.snapshots {
                self.restart("csi-snapshotter")?;
            }
            return self.restart("csi-resizer");
        }
        match name {
            "etcd" => self.start_etcd(),
            "kube-apiserver" => self.start_apiserver(),
            "kube-controller-manager" => self.start_kube_controller_manager(),
            "kube-scheduler" => self.start_kube_scheduler(),
            "csi-scheduler" => self.start_csi_scheduler(),
            "csi-controller" => self.start_csi_controller(),
            "csi-provisioner" => self.start_provisioner(),
            "csi-resizer" => self.start_resizer(),
            "csi-snapshotter" => self.start_snapshotter(),
            "snapshot-controller" => self.start_snapshot_controller(),
            other => bail!("no component {other}"),
        }
    }

    /// Every component's log and the objects lvmlocal deals in, for a
    /// failure report.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for kind in [
            "nodes",
            "csinodes",
            "nodelocalstorages",
            "csistoragecapacities",
            "logicalvolumes",
            "pv",
            "pvc",
            "pods",
            "events",
        ] {
            let listed = self
                .kubectl(&["get", kind, "-A", "-o", "wide"])
                .unwrap_or_else(|err| format!("{err:#}"));
            out.push_str(&format!("--- kubectl get {kind} ---\n{listed}"));
        }
        let capacities = self
            .kubectl(&["get", "csistoragecapacities", "-A", "-o", "yaml"])
            .unwrap_or_default();
        out.push_str(&format!("--- CSIStorageCapacity objects ---\n{capacities}"));
        for service in self.services.values() {
            let log = service.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            out.push_str(&format!(
                "--- {} (last {} lines of {}) ---\n",
                service.name,
                tail.len(),
                service.log_path().display()
            ));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Runs openssl in the cluster's `pki` directory.
    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.path("pki"))
            .output()
            .context("running openssl (scripts/setup.sh installs it)")?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn make_pki(&self) -> anyhow::Result<()> {
        let pki = self.path("pki");
        fs::create_dir_all(&pki)?;
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        self.openssl(
            &[
                &["req", "-x509", "-nodes", "-days", "2"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-subj",
                    "/CN=lvmlocal-test-ca",
                ],
            ]
            .concat(),
        )?;
        self.openssl(
            &[
                &["req", "-nodes"][..],
                &ec,
                &[
                    "-keyout",
                    "apiserver.key",
                    "-out",
                    "apiserver.csr",
                    "-subj",
                    "/CN=kube-apiserver",
                ],
            ]
            .concat(),
        )?;
        // Valid for the host's loopback and for the address a node VM uses.
        fs::write(
            pki.join("san.ext"),
            format!(
                "subjectAltName=IP:127.0.0.1,IP:{HOST_FROM_GUEST},DNS:localhost,DNS:kubernetes.default.svc\n"
            ),
        )?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "apiserver.crt",
        ])?;
        self.openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sa.key",
        ])?;
        self.openssl(&["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        // The control plane's own components act as cluster admins; what is
        // tested is lvmlocal's RBAC, whose components get ServiceAccount tokens.
        fs::write(
            pki.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
        )?;
        Ok(())
    }

    fn start_etcd(&mut self) -> anyhow::Result<()> {
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let mut etcd = Command::new(component("etcd"));
        etcd.args([
            "--name=test",
            &format!("--data-dir={}", self.path("etcd").display()),
            &format!("--listen-client-urls={client}"),
            &format!("--advertise-client-urls={client}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{}", free_port()),
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]);
        self.spawn("etcd", etcd)?;
        let address = format!("127.0.0.1:{}", self.etcd_port);
        wait_for("etcd answering", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&address)
                .map(drop)
                .map_err(|err| err.to_string())
        })?;
        Ok(())
    }

    fn start_apiserver(&mut self) -> anyhow::Result<()> {
        // A port found free can be taken before the server binds it: the
        // kernel hands out the same range to outgoing connections.
        let mut attempts = 1;
        loop {
            match self.spawn_apiserver() {
                Err(_)
                    if attempts < 3
                        && self
                            .service("kube-apiserver")
                            .log()
                            .contains("address already in use") =>
                {
                    attempts += 1;
                    self.api_port = free_port();
                }
                done => return done,
            }
        }
    }

    fn spawn_apiserver(&mut self) -> anyhow::Result<()> {
        let pki = self.path("pki");
        let pki = |name: &str| pki.join(name).display().to_string();
        let mut apiserver = Command::new(component("kube-apiserver"));
        apiserver.args([
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.api_port),
            format!("--tls-cert-file={}", pki("apiserver.crt")),
            format!("--tls-private-key-file={}", pki("apiserver.key")),
            format!("--client-ca-file={}", pki("ca.crt")),
            format!("--token-auth-file={}", pki("tokens.csv")),
            format!("--service-account-key-file={}", pki("sa.pub")),
            format!("--service-account-signing-key-file={}", pki("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            "--watch-cache=true".into(),
            "--v=1".into(),
        ]);
        self.spawn("kube-apiserver", apiserver)?;
        wait_for("kube-apiserver ready", Duration::from_secs(90), || {
            if let Some(status) = self.service("kube-apiserver").exited() {
                return Ok(Err(format!("exited: {status}")));
            }
            self.raw_admin("/readyz")
                .map(|_| Ok(()))
                .map_err(|err| err.to_string())
        })?
        .map_err(|err| anyhow::anyhow!("kube-apiserver {err}\n{}", self.report()))
    }

    /// A GET with the admin token, before any kubeconfig exists.
    fn raw_admin(&self, path: &str) -> anyhow::Result<String> {
        let out = Command::new(component("kubectl"))
            .args([
                &format!("--server={}", self.local_api()),
                &format!(
                    "--certificate-authority={}",
                    self.path("pki/ca.crt").display()
                ),
                &format!("--token={ADMIN_TOKEN}"),
                "get",
                "--raw",
                path,
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `<name>.kubeconfig` for `server` with a bearer token, unless it
    /// exists: processes already started may be reading it.
    fn write_kubeconfig(&self, name: &str, server: &str, token: &str) -> anyhow::Result<PathBuf> {
        self.write_kubeconfig_as(name, server, serde_json::json!({"token": token}))
    }

    /// Writes `<name>.kubeconfig` for `server` with the credentials `user`,
    /// unless it exists.
    fn write_kubeconfig_as(
        &self,
        name: &str,
        server: &str,
        user: Value,
    ) -> anyhow::Result<PathBuf> {
        let path = self.path(&format!("{name}.kubeconfig"));
        if path.exists() {
            return Ok(path);
        }
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": server,
                "certificate-authority": self.path("pki/ca.crt"),
            }}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name}}],
            "current-context": "test",
        });
        let staged = path.with_extension("new");
        fs::write(&staged, serde_json::to_string_pretty(&config)?)?;
        fs::rename(&staged, &path)?;
        Ok(path)
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.path("admin.kubeconfig")
    }

    fn start_kube_controller_manager(&mut self) -> anyhow::Result<()> {
        let mut kcm = Command::new(component("kube-controller-manager"));
        kcm.args([
            format!("--kubeconfig={}", self.admin_kubeconfig().display()),
            // Nodes here have no kubelet: the node-lifecycle controller would
            // taint them all and evict their pods.
            "--controllers=*,-nodelifecycle,-nodeipam,-cloud-node-lifecycle,-service-lb-controller"
                .into(),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            format!("--root-ca-file={}", self.path("pki/ca.crt").display()),
            format!(
                "--service-account-private-key-file={}",
                self.path("pki/sa.key").display()
            ),
            "--v=1".into(),
        ]);
        self.spawn("kube-controller-manager", kcm)
    }

    fn start_kube_scheduler(&mut self) -> anyhow::Result<()> {
        let config = self.path("kube-scheduler.yaml");
        fs::write(&config, self.scheduler_config()?)?;
        let mut scheduler = Command::new(component("kube-scheduler"));
        scheduler.args([
            format!("--config={}", config.display()),
            "--secure-port=0".into(),
            "--v=2".into(),
        ]);
        self.spawn("kube-scheduler", scheduler)
    }

    /// deploy/'s KubeSchedulerConfiguration with this cluster's kubeconfig
    /// and extender address; everything else as shipped.
    fn scheduler_config(&self) -> anyhow::Result<String> {
        let path = workspace_root().join("deploy/scheduler/kube-scheduler-config.yaml");
        let text = fs::read_to_string(&path)?;
        let mut config: Value = serde_norway::from_str(&text)?;
        config["clientConnection"]["kubeconfig"] =
            self.admin_kubeconfig().display().to_string().into();
        config["leaderElection"]["leaderElect"] = false.into();
        let extenders = config["extenders"]
            .as_array_mut()
            .context("deploy's scheduler configuration has no extenders")?;
        for extender in extenders {
            let prefix = extender["urlPrefix"].as_str().unwrap_or_default();
            let path = prefix
                .splitn(4, '/')
                .nth(3)
                .context("extender urlPrefix without a path")?;
            extender["urlPrefix"] =
                format!("http://127.0.0.1:{}/{path}", self.extender_port).into();
        }
        Ok(serde_json::to_string_pretty(&config)?)
    }

    fn apply_deploy(&mut self) -> anyhow::Result<()> {
        if self.options.helm {
            self.helm(&["install", RELEASE, crate::manifests::CHART])?;
        } else {
            self.apply_base()?;
        }
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/logicalvolumes.lvmlocal.io",
            "crd/nodelocalstorages.lvmlocal.io",
        ])?;
        Ok(())
    }

    /// Applies the kustomize base's objects that need no kubelet.
    fn apply_base(&mut self) -> anyhow::Result<()> {
        let applied: Vec<&Value> = self
            .deploy
            .iter()
            .filter(|object| APPLIED_KINDS.contains(&object["kind"].as_str().unwrap_or_default()))
            .collect();
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": applied});
        self.kubectl_stdin(
            &["apply", "--server-side", "-f", "-"],
            &serde_json::to_string(&list)?,
        )?;
        Ok(())
    }

    /// The objects the cluster was installed from, as rendered.
    pub fn deploy(&self) -> &[Value] {
        &self.deploy
    }

    /// `helm <args>` against the cluster as its admin, in the workspace
    /// root, the release's record in the default namespace.
    pub fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(component("helm"))
            .arg(format!(
                "--kubeconfig={}",
                self.admin_kubeconfig().display()
            ))
            .args(["--namespace", "default"])
            .args(args)
            .current_dir(workspace_root())
            .output()
            .context("running helm")?;
        ensure!(
            out.status.success(),
            "helm {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A kubeconfig with a fresh token of ServiceAccount `account` of the
    /// driver's namespace, for a process reaching the API server at `server`.
    pub fn service_account_kubeconfig(
        &mut self,
        account: &str,
        server: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        let token = match self.tokens.get(account) {
            Some(token) => token.clone(),
            None => {
                let token = self
                    .kubectl(&["create", "token", account, "-n", NAMESPACE, "--duration=4h"])?
                    .trim()
                    .to_string();
                self.tokens.insert(account.into(), token.clone());
                token
            }
        };
        self.write_kubeconfig(name, server, &token)
    }

    /// The kubeconfig an agent in a node VM uses.
    pub fn agent_kubeconfig(&mut self) -> anyhow::Result<PathBuf> {
        self.service_account_kubeconfig(
            "lvmlocal-agent",
            &format!("https://{HOST_FROM_GUEST}:{GUEST_API_PORT}"),
            "agent",
        )
    }

    /// The kubeconfig of node `node`'s kubelet in a VM: a client certificate
    /// for `system:node:<node>` in group `system:nodes`, the identity the
    /// Node authorizer grants a kubelet's rights to.
    pub fn kubelet_kubeconfig(&self, node: &str) -> anyhow::Result<PathBuf> {
        let pki = self.path("pki");
        let key = pki.join(format!("kubelet-{node}.key"));
        let csr = pki.join(format!("kubelet-{node}.csr"));
        let crt = pki.join(format!("kubelet-{node}.crt"));
        let subject = format!("/O=system:nodes/CN=system:node:{node}");
        let path = |p: &Path| p.display().to_string();
        self.openssl(&[
            "req",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &path(&key),
            "-out",
            &path(&csr),
            "-subj",
            &subject,
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &path(&csr),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &path(&crt),
        ])?;
        self.write_kubeconfig_as(
            &format!("kubelet-{node}"),
            &format!("https://{HOST_FROM_GUEST}:{GUEST_API_PORT}"),
            serde_json::json!({"client-certificate": crt, "client-key": key}),
        )
    }

    /// The container `name` of deploy/'s workload `workload`.
    fn container(&self, workload: &str, name: &str) -> anyhow::Result<Value> {
        let object = self
            .deploy
            .iter()
            .find(|object| {
                object["metadata"]["name"] == workload
                    && matches!(object["kind"].as_str(), Some("Deployment" | "DaemonSet"))
            })
            .with_context(|| format!("deploy/ has no {workload}"))?;
        object["spec"]["template"]["spec"]["containers"]
            .as_array()
            .and_then(|containers| containers.iter().find(|c| c["name"] == name))
            .cloned()
            .with_context(|| format!("{workload} has no container {name}"))
    }

    /// The container's arguments as deploy/ gives them, with `overrides`
    /// (flag → value) replacing those flags' values.
    fn deploy_args(
        &self,
        workload: &str,
        container: &str,
        overrides: &[(&str, String)],
    ) -> anyhow::Result<Vec<String>> {
        let container = self.container(workload, container)?;
        let mut args: Vec<String> = container["args"]
            .as_array()
            .context("container without args")?
            .iter()
            .filter_map(|arg| arg.as_str().map(str::to_owned))
            .collect();
        for (flag, value) in overrides {
            let set = format!("{flag}={value}");
            match args
                .iter_mut()
                .find(|arg| arg.as_str() == *flag || arg.starts_with(&format!("{flag}=")))
            {
                Some(arg) => *arg = set,
                None => args.push(set),
            }
        }
        Ok(args)
    }

    fn controller_socket(&self) -> PathBuf {
        self.path("controller.sock")
    }

    fn start_csi_scheduler(&mut self) -> anyhow::Result<()> {
        self.spawn_csi_scheduler("lvmlocal-scheduler")?;
        self.wait_extender_health("HTTP/1.1 200")
    }

    /// Restarts csi-scheduler as the namespace's `default` ServiceAccount,
    /// which may read nothing: its caches never complete a listing, as for
    /// an extender that has just started. Returns once it answers.
    pub fn restart_csi_scheduler_unsynced(&mut self) -> anyhow::Result<()> {
        self.service("csi-scheduler").kill();
        self.spawn_csi_scheduler("default")?;
        self.wait_extender_health("HTTP/1.1 503")
    }

    /// Waits until the extender's `/healthz` answers with `status`.
    fn wait_extender_health(&self, status: &str) -> anyhow::Result<()> {
        let address = format!("127.0.0.1:{}", self.extender_port);
        wait_for(
            &format!("csi-scheduler answering {status}"),
            Duration::from_secs(60),
            || {
                std::net::TcpStream::connect(&address).map_err(|err| err.to_string())?;
                let response = crate::guest::http_get(&address, "/healthz");
                response.starts_with(status).then_some(()).ok_or(response)
            },
        )
    }

    fn spawn_csi_scheduler(&mut self, account: &str) -> anyhow::Result<()> {
        let kubeconfig = self.service_account_kubeconfig(
            account,
            &self.local_api(),
            &format!("scheduler-{account}"),
        )?;
        let args = self.deploy_args(
            "lvmlocal-scheduler",
            "scheduler",
            &[
                ("--listen", format!("127.0.0.1:{}", self.extender_port)),
                ("--default-placement", self.options.placement.into()),
            ],
        )?;
        let mut command = Command::new(workspace_binary("csi-scheduler"));
        command
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info");
        self.spawn("csi-scheduler", command)
    }

    fn start_csi_controller(&mut self) -> anyhow::Result<()> {
        let kubeconfig = self.service_account_kubeconfig(
            "lvmlocal-controller",
            &self.local_api(),
            "controller",
        )?;
        let _ = fs::remove_file(self.controller_socket());
        let mut overrides = vec![
            (
                "--csi-endpoint",
                format!("unix://{}", self.controller_socket().display()),
            ),
            (
                "--metrics-address",
                format!("127.0.0.1:{}", self.controller_metrics_port),
            ),
            (
                "--volume-wait-seconds",
                self.options.volume_wait_secs.to_string(),
            ),
        ];
        if let Some(grace) = self.options.unclaimed_grace_secs {
            overrides.push(("--unclaimed-grace-seconds", grace.to_string()));
        }
        let args = self.deploy_args("lvmlocal-controller", "controller", &overrides)?;
        let mut command = Command::new(workspace_binary("csi-controller"));
        command
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", NAMESPACE)
            .env("POD_NAME", "lvmlocal-controller-test")
            .env("RUST_LOG", "info");
        self.spawn("csi-controller", command)
    }

    fn sidecar_command(
        &mut self,
        name: &str,
        container: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Command> {
        let kubeconfig = self.service_account_kubeconfig(
            "lvmlocal-controller",
            &self.local_api(),
            "controller",
        )?;
        let mut overrides = vec![
            (
                "--csi-address",
                self.controller_socket().display().to_string(),
            ),
            ("--kubeconfig", kubeconfig.display().to_string()),
            ("--http-endpoint", format!("127.0.0.1:{}", free_port())),
            ("--leader-election-namespace", NAMESPACE.to_string()),
        ];
        overrides.extend(extra.iter().cloned());
        let args = self.deploy_args("lvmlocal-controller", container, &overrides)?;
        let mut command = Command::new(component(name));
        command
            .args(args)
            .env("NAMESPACE", NAMESPACE)
            .env("POD_NAME", "lvmlocal-controller-test");
        Ok(command)
    }

    fn start_provisioner(&mut self) -> anyhow::Result<()> {
        // No pod runs the provisioner here: its capacity objects get no owner.
        // Capacity is polled every 5 s rather than every minute, so that a
        // test sees a node's new figures without waiting that minute.
        let command = self.sidecar_command(
            "csi-provisioner",
            "csi-provisioner",
            &[
                ("--capacity-ownerref-level", "-1".into()),
                ("--capacity-poll-interval", "5s".into()),
            ],
        )?;
        self.spawn("csi-provisioner", command)
    }

    /// The external-snapshotter's CRDs, as scripts/components.sh fetched
    /// them at the pinned release.
    fn apply_snapshot_crds(&self) -> anyhow::Result<()> {
        let dir = component("csi-snapshotter")
            .parent()
            .context("components directory")?
            .join("../crds/snapshot");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            self.kubectl(&["apply", "--server-side", "-f", &path.display().to_string()])?;
            names.push(path);
        }
        ensure!(
            names.len() == 3,
            "snapshot CRDs in {}: {names:?}",
            dir.display()
        );
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/volumesnapshots.snapshot.storage.k8s.io",
            "crd/volumesnapshotcontents.snapshot.storage.k8s.io",
            "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
        ])?;
        Ok(())
    }

    /// The cluster's snapshot-controller, as its admin (a distribution's
    /// component, not lvmlocal's).
    fn start_snapshot_controller(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(component("snapshot-controller"));
        command.args([
            format!("--kubeconfig={}", self.path("admin.kubeconfig").display()),
            "--leader-election=false".to_owned(),
            format!("--http-endpoint=127.0.0.1:{}", free_port()),
        ]);
        self.spawn("snapshot-controller", command)
    }

    fn start_snapshotter(&mut self) -> anyhow::Result<()> {
        let command = self.sidecar_command("csi-snapshotter", "csi-snapshotter", &[])?;
        self.spawn("csi-snapshotter", command)
    }

    fn start_resizer(&mut self) -> anyhow::Result<()> {
        let command = self.sidecar_command("csi-resizer", "csi-resizer", &[])?;
        self.spawn("csi-resizer", command)
    }

    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_stdin(args, "")
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        let mut child = Command::new(component("kubectl"))
            .arg(format!(
                "--kubeconfig={}",
                self.admin_kubeconfig().display()
            ))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl")?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get <args> -o json`.
    pub fn get(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut args = args.to_vec();
        args.insert(0, "get");
        args.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&args)?)?)
    }

    /// Waits up to five minutes for pod `name` in `namespace` to run, and
    /// returns it.
    pub fn wait_running(&self, namespace: &str, name: &str) -> anyhow::Result<Value> {
        wait_for(
            &format!("pod {name} running"),
            Duration::from_secs(300),
            || {
                let pod = self
                    .get(&["pod", name, "-n", namespace])
                    .map_err(|err| err.to_string())?;
                if pod["status"]["phase"] == "Running" {
                    Ok(pod)
                } else {
                    Err(pod["status"].to_string())
                }
            },
        )
    }

    /// Items of `kubectl get <kind> -o json` (all namespaces for namespaced kinds).
    pub fn list(&self, kind: &str) -> anyhow::Result<Vec<Value>> {
        let list = self.get(&[kind, "-A"])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    pub fn apply(&self, object: &Value) -> anyhow::Result<()> {
        self.kubectl_stdin(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            &serde_json::to_string(object)?,
        )
        .map(drop)
    }

    /// Merge-patches the status subresource of an object.
    pub fn patch_status(&self, kind: &str, name: &str, status: &Value) -> anyhow::Result<()> {
        let patch = serde_json::json!({ "status": status }).to_string();
        self.kubectl(&[
            "patch",
            kind,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ])
        .map(drop)
    }

    /// The capacity the CSIStorageCapacity object of `node` and StorageClass
    /// `class` states, if there is one.
    pub fn storage_capacity(&self, node: &str, class: &str) -> anyhow::Result<Option<u64>> {
        let list = self.get(&["csistoragecapacities", "-n", NAMESPACE])?;
        let found = list["items"].as_array().into_iter().flatten().find(|item| {
            item["storageClassName"] == class
                && item["nodeTopology"]["matchLabels"][TOPOLOGY_KEY] == node
        });
        found
            .map(|item| quantity(item["capacity"].as_str().unwrap_or_default()))
            .transpose()
    }

    /// A Node without kubelet that the scheduler can place pods on, with the
    /// driver's topology label and its CSINode.
    pub fn add_node(&self, name: &str) -> anyhow::Result<()> {
        self.apply(&serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                TOPOLOGY_KEY: name,
            }},
        }))?;
        // Nodes are born tainted not-ready; with no kubelet and no node-lifecycle
        // controller, nothing else would lift it.
        self.kubectl(&[
            "patch",
            "node",
            name,
            "--type=merge",
            "-p",
            r#"{"spec":{"taints":null}}"#,
        ])?;
        let resources = serde_json::json!({"cpu": "16", "memory": "64Gi", "pods": "110"});
        self.patch_status(
            "node",
            name,
            &serde_json::json!({
                "capacity": resources,
                "allocatable": resources,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "a test node without kubelet"}],
            }),
        )?;
        self.apply(&serde_json::json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "CSINode",
            "metadata": {"name": name},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": name, "topologyKeys": [TOPOLOGY_KEY]}]},
        }))
    }

    /// Sets (`key`, `value`) or removes (`key`, `-`) labels of node `name`.
    pub fn label_node(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let mut args = vec![
            "label".to_string(),
            "node".into(),
            name.into(),
            "--overwrite".into(),
        ];
        for (key, value) in labels {
            args.push(if *value == "-" {
                format!("{key}-")
            } else {
                format!("{key}={value}")
            });
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.kubectl(&args).map(drop)
    }

    /// A node whose storage is only what this NodeLocalStorage says: no
    /// agent carries out its volumes, and its heartbeat lasts a day.
    pub fn add_paper_node(&self, name: &str, media: &str, total: u64) -> anyhow::Result<()> {
        self.add_node(name)?;
        self.apply(&serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": format!("lvmlocal-agent-{name}"),
                "namespace": NAMESPACE,
                "labels": {"lvmlocal.io/heartbeat": "agent"},
            },
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": 86400,
                "renewTime": "2026-01-01T00:00:00.000000Z",
            },
        }))?;
        self.apply(&serde_json::json!({
            "apiVersion": "lvmlocal.io/v1alpha1",
            "kind": "NodeLocalStorage",
            "metadata": {"name": name},
            "spec": {"nodeName": name},
        }))?;
        self.patch_status(
            "nodelocalstorage",
            name,
            &serde_json::json!({
                media: {
                    "vgName": format!("lvmlocal-{media}"),
                    "totalBytes": total,
                    "freeBytes": total,
                    "allocatedBytes": 0,
                    "extentBytes": 4 << 20,
                    "free": format!("{}Mi", total >> 20),
                },
                "disks": [],
            }),
        )
    }
}

/// Bytes of a Kubernetes quantity as the sidecars write them (`8188Mi`, `123`).
pub fn quantity(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    if text == "0" {
        return Ok(0);
    }
    crate::parse_size(text.strip_suffix('i').unwrap_or(text))
}

/// Every object `kubectl kustomize deploy/` renders.
impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
    }
}

/// A node of the cluster in a VM: real disks, real LVM, and the agent in
/// Kubernetes mode reaching the API server through the VM's network.
pub struct NodeVm {
    pub name: String,
    pub vm: RunningVm,
    kubeconfig: PathBuf,
}

impl NodeVm {
    /// Boots `vm` as node `name` of `cluster`, labelled to have its disks
    /// claimed, and starts its agent.
    pub fn start(cluster: &mut Cluster, name: &str, vm: Vm) -> anyhow::Result<Self> {
        Self::start_labelled(cluster, name, vm, &[(CLAIM_LABEL, "true")])
    }

    /// Boots `vm` as node `name` of `cluster` with these extra node labels
    /// (none: the agent may claim no disk), and starts its agent.
    pub fn start_labelled(
        cluster: &mut Cluster,
        name: &str,
        vm: Vm,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        cluster.add_node(name)?;
        cluster.label_node(name, labels)?;
        let kubeconfig = cluster.agent_kubeconfig()?;
        let vm = vm.forward(GUEST_API_PORT, cluster.api_port).serve()?;
        let node = Self {
            name: name.into(),
            vm,
            kubeconfig,
        };
        node.start_agent()?;
        Ok(node)
    }

    /// Boots `vm` as a real node `name` of `cluster`: containerd and kubelet
    /// in the guest (vm/kubelet.sh), the node registered by kubelet itself
    /// with these labels, then the agent, which registers the driver with
    /// kubelet. Returns once kubelet reports the node Ready and has the
    /// driver in the node's CSINode.
    pub fn start_with_kubelet(
        cluster: &mut Cluster,
        name: &str,
        vm: Vm,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let kubelet_kubeconfig = cluster.kubelet_kubeconfig(name)?;
        let kubeconfig = cluster.agent_kubeconfig()?;
        let vm = vm.forward(GUEST_API_PORT, cluster.api_port).serve()?;
        let node = Self {
            name: name.into(),
            vm,
            kubeconfig,
        };
        let root = workspace_root();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        node.sh(&format!(
            "NODE_NAME={name} KUBECONFIG={} KUBELET={} IMAGES={} NODE_LABELS={} sh {}",
            kubelet_kubeconfig.display(),
            component("kubelet").display(),
            root.join("target/images/test-images.tar").display(),
            labels.join(","),
            root.join("vm/kubelet.sh").display(),
        ))?;
        wait_for(
            &format!("kubelet registering {name} Ready"),
            Duration::from_secs(300),
            || {
                let node_object = cluster
                    .get(&["node", name])
                    .map_err(|_| node.kubelet_log_tail(20))?;
                let ready = node_object["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                ready.then_some(()).ok_or_else(|| {
                    format!(
                        "{}\n{}",
                        node_object["status"]["conditions"],
                        node.kubelet_log_tail(20)
                    )
                })
            },
        )?;
        // Nothing lifts the not-ready taint a node is born with: the
        // node-lifecycle controller is off, since the other nodes here have
        // no kubelet.
        cluster.kubectl(&[
            "patch",
            "node",
            name,
            "--type=merge",
            "-p",
            r#"{"spec":{"taints":null}}"#,
        ])?;
        node.start_agent_with(&["--kubelet-registration-path", "/run/lvmlocal/csi.sock"])?;
        wait_for(
            &format!("kubelet registering {DRIVER} on {name}"),
            Duration::from_secs(180),
            || {
                let csinode = cluster
                    .get(&["csinode", name])
                    .map_err(|err| err.to_string())?;
                let registered = csinode["spec"]["drivers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|d| d["name"] == DRIVER && d["nodeID"] == name);
                registered.then_some(()).ok_or_else(|| {
                    format!(
                        "{csinode}\n{}\n{}",
                        node.kubelet_log_tail(20),
                        node.agent_log()
                    )
                })
            },
        )?;
        Ok(node)
    }

    /// The last `lines` lines kubelet logged.
    pub fn kubelet_log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.vm.ctl_dir().join("kubelet.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Starts the agent in the guest, in a session of its own.
    pub fn start_agent(&self) -> anyhow::Result<()> {
        self.start_agent_with(&[])
    }

    /// Starts the agent in the guest with these extra arguments.
    pub fn start_agent_with(&self, extra: &[&str]) -> anyhow::Result<()> {
        let agent = workspace_binary("csi-agent");
        // A background job of a non-interactive shell shares the shell's
        // process group, so setsid makes the session without forking and
        // `$!` is the agent, the leader of its session and group.
        let script = format!(
            "mkdir -p /run/lvmlocal\n\
             KUBECONFIG={} NODE_NAME={} POD_NAMESPACE={NAMESPACE} RUST_LOG=info setsid {} \
             --csi-endpoint unix:///run/lvmlocal/csi.sock --metrics-address 127.0.0.1:9808 {} \
             >> /run/vmbed/agent.log 2>&1 &\n\
             echo $! > /run/vmbed/agent.pid\n",
            self.kubeconfig.display(),
            self.name,
            agent.display(),
            extra.join(" "),
        );
        self.sh(&script).map(drop)
    }

    /// SIGKILLs the agent's whole process group, as a crash would, and
    /// waits until the agent is dead.
    pub fn kill_agent(&self) -> anyhow::Result<()> {
        // dash's kill takes `-PID` for a group, but not after `--`.
        self.sh("p=$(cat /run/vmbed/agent.pid)\n\
             [ -n \"$p\" ] || { echo no agent pid; exit 1; }\n\
             kill -KILL -$p\n\
             while [ -e /proc/$p ] && ! grep -q '^State:.Z' /proc/$p/status; do sleep 0.1; done\n")
            .map(drop)
    }

    /// Runs a shell script in the guest; fails unless it exits 0.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let (status, output) = self.vm.exec(script, Duration::from_secs(120))?;
        ensure!(
            status == 0,
            "guest script failed ({status}): {script}\n{output}"
        );
        Ok(output)
    }

    /// `vg/lv size` of every logical volume in the guest.
    pub fn lvs(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let out = self.sh("lvs --noheadings --units b --nosuffix -o vg_name,lv_name,lv_size")?;
        let mut lvs = BTreeMap::new();
        for line in out.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [vg, lv, size] = fields[..] {
                lvs.insert(format!("{vg}/{lv}"), size.parse()?);
            }
        }
        Ok(lvs)
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.vm.ctl_dir().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for NodeVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.agent_log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- agent on {} ---", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            if self.vm.ctl_dir().join("kubelet.log").exists() {
                eprintln!(
                    "--- kubelet on {} ---\n{}",
                    self.name,
                    self.kubelet_log_tail(80)
                );
            }
        }
    }
}
