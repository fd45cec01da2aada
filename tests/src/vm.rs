use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// Set in the guest's environment, so a test binary knows where it runs.
pub const IN_VM_ENV: &str = "LVMLOCAL_IN_VM";

/// PCI slots the two virtio-9p shares sit at; disks may use 0x02..=0x1c.
const HOSTROOT_SLOT: u8 = 0x1e;
const CTL_SLOT: u8 = 0x1f;
/// The AHCI controller that `Vm::ssd` and `Vm::hdd` attach to.
pub const DEFAULT_AHCI_SLOT: u8 = 0x10;
/// An AHCI controller has six ports.
const AHCI_PORTS: u8 = 6;
/// Longest serial number NVMe and ATA identify data can carry.
const SERIAL_MAX: usize = 20;
/// PCI slot of the network card, present only when ports are forwarded.
const NET_SLOT: u8 = 0x1d;
/// The address at which the guest reaches the host's forwarded ports. The
/// guest's user-mode network is restricted: nothing else is reachable, and
/// on the host each connection is one to 127.0.0.1.
pub const HOST_FROM_GUEST: &str = "10.0.2.100";

/// Where a disk is attached: the place that gives it its slot identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskBus {
    /// A namespace of the NVMe controller at PCI `slot` (device number on bus 0).
    Nvme { slot: u8, nsid: u32 },
    /// A SATA disk on `port` of the AHCI controller at PCI `controller`.
    Sata {
        controller: u8,
        port: u8,
        rotational: bool,
    },
}

/// One emulated disk, backed by the sparse image `<disk dir>/<name>.img`.
/// The name is also its serial number, so the disk keeps it when it moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    pub size: u64,
    pub bus: DiskBus,
}

/// What the guest command left behind.
#[derive(Debug, Clone)]
pub struct VmOutput {
    /// Exit status of the command (125 when the guest could not start it).
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    /// The guest's serial console: kernel messages and the init's complaints.
    pub console: String,
    /// From starting qemu until it exited.
    pub elapsed: Duration,
}

impl VmOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// Everything a person needs to see why a guest run went wrong.
    pub fn report(&self) -> String {
        format!(
            "guest exit status {} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- console ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr, self.console
        )
    }
}

/// A VM to boot: its disks, resources and the guest command's environment.
#[derive(Debug, Clone)]
pub struct Vm {
    disks: Vec<Disk>,
    disk_dir: Option<PathBuf>,
    image_dir: PathBuf,
    memory_mib: u32,
    cpus: u8,
    timeout: Duration,
    env: BTreeMap<String, String>,
    stream: bool,
    forwards: Vec<(u16, u16)>,
}

impl Default for Vm {
    fn default() -> Self {
        Self::new()
    }
}

impl Vm {
    pub fn new() -> Self {
        let mut env = BTreeMap::new();
        env.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
        env.insert("HOME".into(), "/root".into());
        env.insert(IN_VM_ENV.into(), "1".into());
        // The guest runs no udev daemon: device-mapper makes its own /dev nodes.
        env.insert("DM_DISABLE_UDEV".into(), "1".into());
        for passed in ["RUST_BACKTRACE", "RUST_LOG"] {
            if let Ok(value) = std::env::var(passed) {
                env.insert(passed.into(), value);
            }
        }
        Self {
            disks: Vec::new(),
            disk_dir: None,
            image_dir: default_image_dir(),
            memory_mib: 1536,
            cpus: 2,
            timeout: Duration::from_secs(600),
            env,
            stream: false,
            forwards: Vec::new(),
        }
    }

    /// Lets the guest reach `127.0.0.1:host_port` of the host as
    /// `HOST_FROM_GUEST:guest_port`, one new host connection per guest one.
    pub fn forward(mut self, guest_port: u16, host_port: u16) -> Self {
        self.forwards.push((guest_port, host_port));
        self
    }

    /// An NVMe controller at PCI `slot` with namespace 1 of `size` bytes.
    pub fn nvme(self, name: &str, slot: u8, size: u64) -> Self {
        self.nvme_ns(name, slot, 1, size)
    }

    /// Namespace `nsid` of the NVMe controller at PCI `slot`.
    pub fn nvme_ns(self, name: &str, slot: u8, nsid: u32, size: u64) -> Self {
        self.disk(Disk {
            name: name.into(),
            size,
            bus: DiskBus::Nvme { slot, nsid },
        })
    }

    /// A non-rotational SATA disk on `port` of the default AHCI controller.
    pub fn ssd(self, name: &str, port: u8, size: u64) -> Self {
        self.sata(name, DEFAULT_AHCI_SLOT, port, false, size)
    }

    /// A 7200 rpm SATA disk on `port` of the default AHCI controller.
    pub fn hdd(self, name: &str, port: u8, size: u64) -> Self {
        self.sata(name, DEFAULT_AHCI_SLOT, port, true, size)
    }

    pub fn sata(self, name: &str, controller: u8, port: u8, rotational: bool, size: u64) -> Self {
        self.disk(Disk {
            name: name.into(),
            size,
            bus: DiskBus::Sata {
                controller,
                port,
                rotational,
            },
        })
    }

    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    /// Keep the disk images in `dir` (created if missing), so a later boot can
    /// attach the same disks again, in the same places or in others. Without it
    /// the images live in a temporary directory for one run.
    pub fn disk_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.disk_dir = Some(dir.into());
        self
    }

    /// The directory holding `vmlinuz` and `initramfs.cpio.gz` (see vm/image.sh).
    pub fn image_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.image_dir = dir.into();
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, cpus: u8) -> Self {
        self.cpus = cpus;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Copy the guest command's output to this process's stdout and stderr
    /// while it runs.
    pub fn stream(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// Boots the VM, runs `argv` as root in the host's current directory
    /// inside the guest, and powers the VM off when it exits.
    pub fn run<S: AsRef<str>>(&self, argv: &[S]) -> anyhow::Result<VmOutput> {
        self.spawn(argv)?.wait()
    }

    /// Boots the VM with a guest that runs whatever `RunningVm::exec` hands
    /// it, until the VM is powered off.
    pub fn serve(&self) -> anyhow::Result<RunningVm> {
        self.spawn(&["/bin/bash", "-c", SERVE_LOOP])
    }

    /// Boots the VM and starts `argv` in the guest as `run` does, returning
    /// while it runs.
    pub fn spawn<S: AsRef<str>>(&self, argv: &[S]) -> anyhow::Result<RunningVm> {
        ensure!(!argv.is_empty(), "no command to run in the guest");
        check_layout(&self.disks)?;
        let kernel = self.image_dir.join("vmlinuz");
        let initramfs = self.image_dir.join("initramfs.cpio.gz");
        for file in [&kernel, &initramfs] {
            ensure!(
                file.is_file(),
                "{} is missing: build the test bed's boot files with vm/image.sh (scripts/setup.sh does)",
                file.display()
            );
        }

        let scratch = tempfile::Builder::new().prefix("lvmlocal-vm-").tempdir()?;
        let disk_dir = match &self.disk_dir {
            Some(dir) => dir.clone(),
            None => scratch.path().join("disks"),
        };
        fs::create_dir_all(&disk_dir)
            .with_context(|| format!("creating disk directory {}", disk_dir.display()))?;
        let ctl = scratch.path().join("ctl");
        fs::create_dir(&ctl)?;
        fs::write(ctl.join("disks"), format!("{}\n", self.disks.len()))?;
        if !self.forwards.is_empty() {
            fs::write(ctl.join("net"), "")?;
        }
        let cwd = std::env::current_dir()?;
        fs::write(ctl.join("job.sh"), job_script(&cwd, &self.env, argv))?;
        for name in ["stdout", "stderr"] {
            fs::write(ctl.join(name), "")?;
        }

        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            "max".into(),
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-nodefaults".into(),
            "-vga".into(),
            "none".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            "stdio".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initramfs.display().to_string(),
            "-append".into(),
            "console=ttyS0 quiet panic=-1".into(),
        ];
        args.extend(share_args("hostroot", Path::new("/"), HOSTROOT_SLOT, true));
        args.extend(share_args("ctl", &ctl, CTL_SLOT, false));
        args.extend(disk_args(&self.disks, &disk_dir)?);
        args.extend(net_args(&self.forwards));

        let started = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64 (is the qemu-system-x86 package installed?)")?;
        let console = collect(child.stdout.take().expect("piped stdout"));
        let qemu_stderr = collect(child.stderr.take().expect("piped stderr"));
        Ok(RunningVm {
            child,
            console: Some(console),
            qemu_stderr: Some(qemu_stderr),
            ctl,
            started,
            deadline: started + self.timeout,
            timeout: self.timeout,
            stream: self.stream,
            jobs: Default::default(),
            _scratch: scratch,
        })
    }
}

/// The guest side of `exec`: runs each script the host drops in the control
/// share, one at a time, and leaves its output and exit status beside it.
/// It waits with bash's builtin `read -t` on a FIFO nobody writes: a
/// `sleep` forked ten times a second costs a third of a host core under TCG.
const SERVE_LOOP: &str = r#"mkdir -p /run/vmbed/exec && cd /run/vmbed/exec || exit 125
mkfifo /run/vmbed-wait && exec 3<>/run/vmbed-wait || exit 125
while :; do
    for job in *.sh; do
        [ -e "$job" ] || continue
        n=${job%.sh}
        /bin/sh "$job" > "$n.out" 2>&1 < /dev/null 3<&-
        echo $? > "$n.tmp" && mv "$n.tmp" "$n.rc"
        rm -f "$job"
    done
    read -r -t 0.1 -u 3 _
done"#;

/// A booted VM whose guest command is running.
pub struct RunningVm {
    child: Child,
    console: Option<thread::JoinHandle<String>>,
    qemu_stderr: Option<thread::JoinHandle<String>>,
    ctl: PathBuf,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    stream: bool,
    jobs: std::sync::atomic::AtomicU32,
    _scratch: tempfile::TempDir,
}

impl RunningVm {
    /// Runs `script` with /bin/sh in a guest booted by `Vm::serve` and returns
    /// its exit status and output (stdout and stderr together).
    pub fn exec(&self, script: &str, timeout: Duration) -> anyhow::Result<(i32, String)> {
        let dir = self.ctl.join("exec");
        fs::create_dir_all(&dir)?;
        let n = self.jobs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let staged = dir.join(format!("{n}.new"));
        fs::write(&staged, script)?;
        fs::rename(&staged, dir.join(format!("{n}.sh")))?;
        let rc = dir.join(format!("{n}.rc"));
        let deadline = Instant::now() + timeout;
        while !rc.exists() {
            ensure!(
                Instant::now() < deadline,
                "guest script did not finish within {timeout:?}: {script}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        let status = fs::read_to_string(&rc)?.trim().parse()?;
        let output = fs::read_to_string(dir.join(format!("{n}.out")))?;
        Ok((status, output))
    }

    /// The directory the guest sees as /run/vmbed: a place for logs of
    /// processes the guest starts.
    pub fn ctl_dir(&self) -> &Path {
        &self.ctl
    }

    /// Waits for the guest command to finish and the VM to power off.
    pub fn wait(mut self) -> anyhow::Result<VmOutput> {
        let stream = self.stream;
        let mut tails = [
            Tail::new(self.ctl.join("stdout"), Box::new(std::io::stdout())),
            Tail::new(self.ctl.join("stderr"), Box::new(std::io::stderr())),
        ];
        let exit = wait(&mut self.child, self.deadline, || {
            if stream {
                tails.iter_mut().for_each(Tail::forward);
            }
        })?;
        if stream {
            tails.iter_mut().for_each(Tail::forward);
        }
        let elapsed = self.started.elapsed();
        let joined = |pipe: Option<thread::JoinHandle<String>>| {
            pipe.and_then(|pipe| pipe.join().ok()).unwrap_or_default()
        };
        let console = joined(self.console.take());
        let qemu_stderr = joined(self.qemu_stderr.take());
        let ctl = &self.ctl;

        let Some(exit) = exit else {
            bail!(
                "the VM did not finish within {:?}\n--- console ---\n{console}",
                self.timeout
            );
        };
        let rc = fs::read_to_string(ctl.join("rc")).ok();
        let Some(status) = rc.and_then(|rc| rc.trim().parse().ok()) else {
            bail!(
                "the VM stopped ({exit}) before the guest command finished\n--- qemu ---\n{qemu_stderr}\n--- console ---\n{console}"
            );
        };
        Ok(VmOutput {
            status,
            stdout: fs::read_to_string(ctl.join("stdout"))?,
            stderr: fs::read_to_string(ctl.join("stderr"))?,
            console: console.replace('\r', ""),
            elapsed,
        })
    }
}

/// Dropping a VM that still runs pulls its plug, whatever the guest is doing.
impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// qemu arguments for a restricted user-mode network whose only way out is
/// the forwarded ports (none: no network card at all).
fn net_args(forwards: &[(u16, u16)]) -> Vec<String> {
    if forwards.is_empty() {
        return Vec::new();
    }
    let mut netdev = String::from("user,id=net0,restrict=on");
    for (guest, host) in forwards {
        netdev.push_str(&format!(
            ",guestfwd=tcp:{HOST_FROM_GUEST}:{guest}-cmd:socat - TCP:127.0.0.1:{host}"
        ));
    }
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!("virtio-net-pci,netdev=net0,addr={NET_SLOT:#x}"),
    ]
}

/// `<workspace>/target/vm` unless `LVMLOCAL_VM_DIR` says otherwise.
fn default_image_dir() -> PathBuf {
    match std::env::var_os("LVMLOCAL_VM_DIR") {
        Some(dir) => dir.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vm"),
    }
}

/// Rejects layouts qemu would refuse or that would silently differ from
/// what the caller asked for.
fn check_layout(disks: &[Disk]) -> anyhow::Result<()> {
    let mut slots: BTreeMap<u8, &str> = BTreeMap::new();
    let mut places = std::collections::BTreeSet::new();
    let mut names = std::collections::BTreeSet::new();
    for disk in disks {
        ensure!(
            !disk.name.is_empty()
                && disk.name.len() <= SERIAL_MAX
                && disk
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "disk name {:?} must be 1-{SERIAL_MAX} characters of [A-Za-z0-9_-]",
            disk.name
        );
        ensure!(
            names.insert(&disk.name),
            "two disks are named {:?}",
            disk.name
        );
        ensure!(disk.size > 0, "disk {} has size zero", disk.name);
        let (slot, kind, place) = match disk.bus {
            DiskBus::Nvme { slot, nsid } => {
                ensure!(
                    nsid >= 1,
                    "disk {}: NVMe namespace ids start at 1",
                    disk.name
                );
                (slot, "nvme", (slot, nsid))
            }
            DiskBus::Sata {
                controller, port, ..
            } => {
                ensure!(
                    port < AHCI_PORTS,
                    "disk {}: an AHCI controller has ports 0-{}",
                    disk.name,
                    AHCI_PORTS - 1
                );
                (controller, "ahci", (controller, u32::from(port)))
            }
        };
        ensure!(
            (0x02..NET_SLOT).contains(&slot),
            "disk {}: PCI slot {slot:#x} is outside 0x02-0x1c",
            disk.name
        );
        ensure!(
            *slots.entry(slot).or_insert(kind) == kind,
            "PCI slot {slot:#x} cannot hold both an NVMe and an AHCI controller"
        );
        ensure!(
            places.insert(place),
            "disk {}: its place is already taken",
            disk.name
        );
    }
    Ok(())
}

fn share_args(tag: &str, path: &Path, slot: u8, readonly: bool) -> [String; 4] {
    let ro = if readonly { ",readonly=on" } else { "" };
    [
        "-fsdev".into(),
        format!(
            "local,id={tag},path={},security_model=none,multidevs=remap{ro}",
            path.display()
        ),
        "-device".into(),
        format!("virtio-9p-pci,fsdev={tag},mount_tag={tag},addr={slot:#x}"),
    ]
}

/// qemu arguments for the disks, creating any image that does not exist yet.
fn disk_args(disks: &[Disk], dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut args = Vec::new();
    let mut controllers = std::collections::BTreeSet::new();
    for disk in disks {
        let image = dir.join(format!("{}.img", disk.name));
        ensure_image(&image, disk.size)?;
        let drive = format!("drive-{}", disk.name);
        args.push("-drive".into());
        args.push(format!(
            // Zeros written by the guest (a deleted volume is zeroed whole)
            // become holes in the sparse image instead of filling the
            // host's disk.
            "file={},if=none,id={drive},format=raw,cache=unsafe,discard=unmap,detect-zeroes=unmap",
            image.display()
        ));
        match disk.bus {
            DiskBus::Nvme { slot, nsid } => {
                let ctrl = format!("nvme{slot:x}");
                if controllers.insert(slot) {
                    args.push("-device".into());
                    args.push(format!(
                        "nvme,id={ctrl},serial={},addr={slot:#x}",
                        disk.name
                    ));
                }
                args.push("-device".into());
                args.push(format!("nvme-ns,drive={drive},bus={ctrl},nsid={nsid}"));
            }
            DiskBus::Sata {
                controller,
                port,
                rotational,
            } => {
                let ctrl = format!("ahci{controller:x}");
                if controllers.insert(controller) {
                    args.push("-device".into());
                    args.push(format!("ahci,id={ctrl},addr={controller:#x}"));
                }
                // rotation_rate 1 is how ATA says "non-rotating medium".
                let rate = if rotational { 7200 } else { 1 };
                args.push("-device".into());
                args.push(format!(
                    "ide-hd,drive={drive},bus={ctrl}.{port},serial={},rotation_rate={rate}",
                    disk.name
                ));
            }
        }
    }
    Ok(args)
}

fn ensure_image(image: &Path, size: u64) -> anyhow::Result<()> {
    match fs::metadata(image) {
        Ok(meta) => ensure!(
            meta.len() == size,
            "{} exists with {} bytes, not the {size} asked for",
            image.display(),
            meta.len()
        ),
        Err(_) => fs::File::create(image)
            .and_then(|file| file.set_len(size))
            .with_context(|| format!("creating disk image {}", image.display()))?,
    }
    Ok(())
}

/// The script the guest runs: the caller's directory, environment and argv.
fn job_script<S: AsRef<str>>(cwd: &Path, env: &BTreeMap<String, String>, argv: &[S]) -> String {
    let mut script = format!("cd {} || exit 125\n", quote(&cwd.display().to_string()));
    for (key, value) in env {
        script.push_str(&format!("export {key}={}\n", quote(value)));
    }
    let argv: Vec<String> = argv.iter().map(|arg| quote(arg.as_ref())).collect();
    script.push_str(&format!("exec {}\n", argv.join(" ")));
    script
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn collect(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for qemu, calling `tick` while it runs; kills it at `deadline`.
fn wait(
    child: &mut Child,
    deadline: Instant,
    mut tick: impl FnMut(),
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        tick();
        thread::sleep(Duration::from_millis(100));
    }
}

/// Follows a file the guest appends to and copies what is new to `sink`.
struct Tail {
    path: PathBuf,
    offset: u64,
    sink: Box<dyn Write>,
}

impl Tail {
    fn new(path: PathBuf, sink: Box<dyn Write>) -> Self {
        Self {
            path,
            offset: 0,
            sink,
        }
    }

    fn forward(&mut self) {
        let Ok(mut file) = fs::File::open(&self.path) else {
            return;
        };
        let mut fresh = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_ok() && file.read_to_end(&mut fresh).is_ok() {
            self.offset += fresh.len() as u64;
            let _ = self.sink.write_all(&fresh);
            let _ = self.sink.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GIB;

    #[test]
    fn layout_rejects_clashes() {
        let ok = Vm::new()
            .nvme("a", 5, GIB)
            .nvme_ns("b", 5, 2, GIB)
            .ssd("c", 0, GIB)
            .hdd("d", 1, GIB);
        check_layout(ok.disks()).unwrap();

        let cases = [
            Vm::new().nvme("a", 5, GIB).nvme("b", 5, GIB),
            Vm::new().nvme("a", 0x10, GIB).ssd("b", 0, GIB),
            Vm::new().ssd("a", 0, GIB).hdd("b", 0, GIB),
            Vm::new().ssd("a", 6, GIB),
            Vm::new().nvme("a", 0x1e, GIB),
            Vm::new().nvme("a", 1, GIB),
            Vm::new().nvme("a", 5, GIB).nvme("a", 6, GIB),
            Vm::new().nvme("bad name", 5, GIB),
            Vm::new().nvme("a", 5, 0),
            Vm::new().nvme_ns("a", 5, 0, GIB),
        ];
        for vm in cases {
            assert!(
                check_layout(vm.disks()).is_err(),
                "{:?} accepted",
                vm.disks()
            );
        }
    }

    #[test]
    fn qemu_sees_each_disk_where_asked() {
        let dir = tempfile::tempdir().unwrap();
        let vm = Vm::new()
            .nvme("n1", 5, GIB)
            .nvme_ns("n2", 5, 2, GIB)
            .hdd("h1", 3, 2 * GIB);
        let args = disk_args(vm.disks(), dir.path()).unwrap().join(" ");
        assert!(args.contains("nvme,id=nvme5,serial=n1,addr=0x5"), "{args}");
        assert_eq!(args.matches("-device nvme,").count(), 1, "{args}");
        assert!(
            args.contains("nvme-ns,drive=drive-n2,bus=nvme5,nsid=2"),
            "{args}"
        );
        assert!(args.contains("ahci,id=ahci10,addr=0x10"), "{args}");
        assert!(
            args.contains("ide-hd,drive=drive-h1,bus=ahci10.3,serial=h1,rotation_rate=7200"),
            "{args}"
        );
        assert_eq!(
            fs::metadata(dir.path().join("h1.img")).unwrap().len(),
            2 * GIB
        );
    }

    #[test]
    fn an_image_keeps_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("x.img");
        ensure_image(&image, GIB).unwrap();
        ensure_image(&image, GIB).unwrap();
        assert!(ensure_image(&image, 2 * GIB).is_err());
    }

    #[test]
    fn job_script_quotes_everything() {
        let env = BTreeMap::from([("A".to_string(), "it's".to_string())]);
        let script = job_script(Path::new("/w d"), &env, &["echo", "a b", "$HOME"]);
        assert_eq!(
            script,
            "cd '/w d' || exit 125\nexport A='it'\\''s'\nexec 'echo' 'a b' '$HOME'\n"
        );
    }
}
