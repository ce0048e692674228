//! `baton bus credentials`: one nkey per NATS user of Baton.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use baton_core::bus::NATS_USERS;

/// The notifier's secrets file in the credentials folder.
pub const WEBHOOKS_FILE: &str = "webhooks.yaml";

const WEBHOOKS_TEMPLATE: &str = "\
# The notifier's webhook URLs: one line per channel of the configuration's `notifications:`,
#   <channel>: <url>
# e.g.
#   web-team: https://hooks.slack.com/services/T000/B000/XXXX
#   audit: https://audit.example.com/baton/events
# These are secrets: keep them here (or in a Secret), never in baton.yaml.
{}
";

pub fn write(out: &Path, force: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let env_path = out.join("nkeys.env");
    if !force {
        for user in NATS_USERS {
            let p = out.join(format!("{user}.nk"));
            if p.exists() {
                bail!(
                    "{} exists; pass --force to replace every credential in {}",
                    p.display(),
                    out.display()
                );
            }
        }
        if env_path.exists() {
            bail!("{} exists; pass --force to replace it", env_path.display());
        }
    }
    let mut env =
        String::from("# Public nkeys of Baton's NATS users, read by bus-config/nats-server.conf\n");
    for user in NATS_USERS {
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().context("encoding an nkey seed")?;
        let path = out.join(format!("{user}.nk"));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(file, "{seed}").with_context(|| format!("writing {}", path.display()))?;
        env.push_str(&format!(
            "BATON_NKEY_{}={}\n",
            user.to_uppercase().replace('-', "_"),
            pair.public_key()
        ));
    }
    std::fs::write(&env_path, env).with_context(|| format!("writing {}", env_path.display()))?;
    let webhooks = out.join(WEBHOOKS_FILE);
    if !webhooks.exists() {
        // The notifier's secrets file, for the URLs a person adds: never replaced, even with
        // --force.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&webhooks)
            .with_context(|| format!("writing {}", webhooks.display()))?;
        file.write_all(WEBHOOKS_TEMPLATE.as_bytes())
            .with_context(|| format!("writing {}", webhooks.display()))?;
        println!(
            "wrote {} for the notifier's webhook URLs (no channel yet)",
            webhooks.display()
        );
    }
    println!(
        "wrote credentials for {} to {}",
        NATS_USERS.join(", "),
        out.display()
    );
    println!(
        "start nats-server with the variables of {} in its environment",
        env_path.display()
    );
    Ok(())
}
