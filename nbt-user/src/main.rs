fn main() {
    std::process::exit(nbt::cmd::main());
}
