//! `certd generate-assets`: the man pages and shell completions, for
//! packaging.

use anyhow::Context as _;

use super::{Cli, man};

/// Man pages (one per command, `certd(1)` with exit status, signals and
/// files, and `certd.toml(5)`) and bash, zsh and fish completions, all
/// generated from the clap definitions and the annotated example
/// configuration so they cannot drift from the code.
pub(super) fn generate_assets(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man).context("writing man pages")?;
    man::write_pages(cmd.clone(), &man).context("writing certd(1) and certd.toml(5)")?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "certd", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}
