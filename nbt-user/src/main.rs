fn main() {
    std::process::exit(nbt::cli::main());
}
