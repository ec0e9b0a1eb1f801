//! spillway-bench: the load generator (work in progress).

fn main() {}
