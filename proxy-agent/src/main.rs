fn main() -> anyhow::Result<()> {
    env_logger::init();
    let _ = twill_agent::datapath::EBPF_OBJECT.len();
    Ok(())
}
