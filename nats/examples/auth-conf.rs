//! Prints `nats/auth.conf`: `cargo run -p landslide-nats --example auth-conf > nats/auth.conf`.

fn main() {
    print!("{}", landslide_nats::auth::auth_conf());
}
