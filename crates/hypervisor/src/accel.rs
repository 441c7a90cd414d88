//! Choosing KVM or TCG for this node's guests.

use model::Accel;

/// KVM when this host can run ordinary guests with it, TCG otherwise. `/dev/kvm` alone is
/// not enough: a nested, paravirtual KVM (kvm_pvm) opens fine and runs guests a hundred
/// times slower than TCG, so KVM counts only with a hardware module (kvm_intel, kvm_amd)
/// and the CPU's vmx or svm flag. `CONVERGE_ACCEL=kvm|tcg` overrides the choice.
pub fn detect_accel() -> Accel {
    match std::env::var("CONVERGE_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let device = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let module = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"].iter().any(|m| std::path::Path::new(m).exists());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm")))
        .unwrap_or(false);
    if device && module && cpu {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}
