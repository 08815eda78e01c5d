//! Engine configuration: a TOML file and environment variables (the input is split at the
//! first NUL: TOML before, `KEY=value` lines after), then what the layers read from it.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use rio::EngineConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (toml, env) = text.split_once('\0').unwrap_or((&text, ""));
    let vars: HashMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
    let mut cfg = EngineConfig::default();
    let toml_ok = cfg.apply_toml(toml, "fuzz.toml").is_ok();
    let env_ok = cfg
        .apply_env(|k| vars.get(k).map(|v| v.to_string()))
        .is_ok();
    if toml_ok && env_ok {
        let _ = cfg.runtime_config();
        let _ = cfg.nvme_options();
        let _ = cfg.backend_name();
    }
});
