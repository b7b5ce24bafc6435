//! `landslide-bench`: measures every stage of Landslide against its ceiling in one run.

fn main() {}
