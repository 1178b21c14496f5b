fn main() {
    eprintln!("burrow: the node front end is being built; see the README");
    std::process::exit(2);
}
