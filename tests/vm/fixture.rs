//! What every VM test needs: the check that it runs in the VM, and a module loader switched
//! off for the length of a test.

/// These tests assume the VM `cargo xtask vm-test` boots: say so instead of failing obscurely.
pub fn in_vm() {
    assert_eq!(
        std::env::var("CORRAL_VM").as_deref(),
        Ok("1"),
        "this test runs inside the VM tier's kernel: run it with `cargo xtask vm-test`"
    );
}

/// Restores the kernel's module loader when dropped.
pub struct ModprobeOff(String);

impl ModprobeOff {
    pub fn new() -> ModprobeOff {
        let old = std::fs::read_to_string("/proc/sys/kernel/modprobe").expect("read modprobe");
        std::fs::write("/proc/sys/kernel/modprobe", "/bin/false").expect("disable modprobe");
        ModprobeOff(old.trim().to_string())
    }
}

impl Drop for ModprobeOff {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/modprobe", &self.0);
    }
}
