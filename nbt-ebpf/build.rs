// Rebuild the BPF object when the linker changes (as aya-template does): a new bpf-linker can change
// the code it emits without any source file changing.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
