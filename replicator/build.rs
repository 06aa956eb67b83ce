//! Builds the kernel program (`replicator-ebpf`) for `bpfel-unknown-none` with the nightly
//! toolchain and bpf-linker, so that `src/tracker/mod.rs` can embed the object with
//! `include_bytes_aligned!`: one `cargo build` builds both halves.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "replicator-ebpf")
        .ok_or_else(|| anyhow!("the replicator-ebpf package is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("replicator-ebpf manifest has no parent directory"))?;
    // aya-build watches the eBPF crate; the program also compiles the shared crate in.
    let common_dir = root_dir.parent().map(|p| p.join("replicator-common"));
    if let Some(common_dir) = common_dir {
        println!("cargo:rerun-if-changed={common_dir}");
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
