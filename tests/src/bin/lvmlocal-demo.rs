//! The demo: boots the VM test bed with 2 NVMe, 1 SSD and 1 HDD disk, starts
//! the agent standalone inside, and walks volumes through their whole life
//! over the agent's CSI socket, printing each step and its time.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Context;
use lvmlocal_tests::csi::{Agent, Walk, walk};
use lvmlocal_tests::guest::{self, workspace_binary};
use lvmlocal_tests::{GIB, Vm};

fn main() -> anyhow::Result<ExitCode> {
    if guest::inside() {
        return guest_side();
    }
    let exe = std::env::current_exe()?;
    let output = Vm::new()
        .nvme("nvme-a", 5, 8 * GIB)
        .nvme("nvme-b", 6, 8 * GIB)
        .ssd("ssd-a", 0, 4 * GIB)
        .hdd("hdd-a", 1, 16 * GIB)
        .stream(true)
        .run(&[exe.to_str().context("exe path")?])?;
    Ok(ExitCode::from(u8::try_from(output.status).unwrap_or(1)))
}

fn guest_side() -> anyhow::Result<ExitCode> {
    let agent = workspace_binary("csi-agent");
    println!("== what the agent finds: csi-agent discover");
    let status = Command::new(&agent)
        .args(["discover", "--claim-disks"])
        .status()?;
    anyhow::ensure!(status.success(), "csi-agent discover failed");

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        println!("\n== csi-agent --standalone: builds the volume groups, serves CSI");
        let socket = Path::new("/run/lvmlocal/csi.sock");
        std::fs::create_dir_all("/run/lvmlocal")?;
        let (_agent, csi) = Agent::start(&agent, socket, "nvme").await?;
        for (media, fs, size, grown) in [
            ("nvme", "ext4", GIB, 2 * GIB),
            ("hdd", "xfs", 2 * GIB, 4 * GIB),
        ] {
            println!(
                "\n== a {size_gib} GiB {fs} volume on {media}, grown online to {grown_gib} GiB",
                size_gib = size / GIB,
                grown_gib = grown / GIB
            );
            let plan = Walk {
                name: format!("demo-{media}-{fs}"),
                media: media.into(),
                fs: Some(fs.into()),
                size,
                grown,
                twice: false,
            };
            let mut log = |name: &str, took: Duration, detail: String| {
                if name.is_empty() {
                    println!("   {detail}");
                } else {
                    println!("{name:<24} {:>9.1?}  {detail}", took);
                }
            };
            walk(&csi, &plan, &mut log).await?;
        }
        println!("\n== done: every volume created, used, grown and removed");
        Ok(ExitCode::SUCCESS)
    })
}
