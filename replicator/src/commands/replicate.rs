//! `replicator primary` and `replicator secondary`: the two ends of a live mirror.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;

use crate::auth::Key;
use crate::metrics::{self, PrimaryMetrics, SecondaryMetrics};
use crate::secondary::{self, SecondaryConfig};
use crate::shipper::{Engine, ShipperConfig};

/// `NAME=ADDR:PORT`, as `--secondary` takes it.
pub fn parse_secondary(text: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = text.split_once('=').ok_or_else(|| format!("{text:?}: expected NAME=ADDR:PORT"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("{name:?}: a secondary's name is letters, digits, '-' and '_'"));
    }
    let addr = addr.parse().map_err(|e| format!("{addr:?}: {e}; expected ADDR:PORT, e.g. 10.0.0.2:7788"))?;
    Ok((name.to_owned(), addr))
}

pub fn primary(
    config: ShipperConfig,
    key_file: &Path,
    metrics_addr: Option<SocketAddr>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let key = Arc::new(Key::from_file(key_file)?);
    let device = config.device.clone();
    let metrics = Arc::new(PrimaryMetrics::default());
    if let Some(addr) = metrics_addr {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        metrics::serve(addr, registry)?;
    }
    let engine = Engine::new(config, key, metrics)
        .with_context(|| format!("starting the primary on {}", device.display()))?;
    engine.run(stop).context("primary engine")?;
    Ok(())
}

pub fn secondary(
    config: &SecondaryConfig,
    key_file: &Path,
    metrics_addr: Option<SocketAddr>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let key = Arc::new(Key::from_file(key_file)?);
    let stats = SecondaryMetrics::default();
    if let Some(addr) = metrics_addr {
        let mut registry = prometheus_client::registry::Registry::default();
        stats.register(&mut registry);
        metrics::serve(addr, registry)?;
    }
    secondary::serve(config, key, stop, &stats)
        .with_context(|| format!("serving {}", config.device.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secondary_arguments() {
        assert_eq!(parse_secondary("b=10.0.0.2:7788").unwrap().0, "b");
        assert!(parse_secondary("10.0.0.2:7788").is_err());
        assert!(parse_secondary("b=nohost").is_err());
        assert!(parse_secondary("a b=10.0.0.2:1").is_err());
    }
}
