//! The `twill-cni` executable: wire the process environment and streams to
//! [`twill_cni::run`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use twill_cni::version::CniVersion;

fn main() -> ExitCode {
    // Not a CNI call: DEL started us to delete a link it retired (see
    // `Dataplane::retire_host_link`). Nobody reads our output; GC covers failure.
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, name, index] = args.as_slice()
        && flag == twill_cni::netlink::REAP_ARG
    {
        let Ok(index) = index.parse() else {
            return ExitCode::FAILURE;
        };
        return match twill_cni::netlink::reap_retired_link(name, index) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    // Only CNI_* variables matter; non-UTF-8 values are passed lossily and then
    // rejected by validation with a message naming the variable.
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with("CNI_")
                .then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect();
    let mut stdin = Vec::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let err = twill_cni::CniError::Decode(format!("reading stdin failed: {e}"));
        let _ = writeln!(out, "{}", err.to_json(CniVersion::LATEST));
        return ExitCode::FAILURE;
    }
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        twill_cni::run(&env, &stdin, &mut out, twill_cni::netlink::Netlink::new)
    }));
    match code {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(_) => {
            let err = twill_cni::CniError::Internal("twill-cni panicked; see stderr".into());
            let _ = writeln!(out, "{}", err.to_json(CniVersion::LATEST));
            ExitCode::FAILURE
        }
    }
}
