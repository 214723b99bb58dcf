//! Twill's kernel programs. Built for `bpfel-unknown-none` by `twill-agent`'s build script
//! (aya-build) and embedded in the agent binary.
//!
//! Every program follows one shape: a thin entry point calls a `try_*` body that returns
//! `Result<Verdict, Reason>`, and a single exit records the `Reason` in the per-CPU `STATS` map.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        clippy::inline_always,
        reason = "BPF-to-BPF calls take at most five arguments and each frame costs verifier \
                  state and stack: every helper is inlined into its program on purpose"
    )
)]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        clippy::needless_pass_by_value,
        reason = "the program macros define entry points taking their context by value"
    )
)]

#[cfg(target_arch = "bpf")]
mod fwd;
#[cfg(target_arch = "bpf")]
mod fwd6;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod masq;
#[cfg(target_arch = "bpf")]
mod monitor;
#[cfg(target_arch = "bpf")]
mod nat6;
#[cfg(target_arch = "bpf")]
mod natport;
#[cfg(target_arch = "bpf")]
mod ns6;
#[cfg(target_arch = "bpf")]
mod pkt;
#[cfg(target_arch = "bpf")]
mod pkt6;
#[cfg(target_arch = "bpf")]
mod pod;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod policy6;
#[cfg(target_arch = "bpf")]
mod sav;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod sockiter;
#[cfg(target_arch = "bpf")]
mod tc;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// On the host this crate is only type-checked (clippy); the real programs exist for bpf only.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
