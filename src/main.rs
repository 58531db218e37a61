fn main() {
    println!("fqdnwall");
}
