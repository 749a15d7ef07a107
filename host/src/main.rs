fn main() -> std::process::ExitCode {
    soulbox_host::cli::main()
}
