mod image;
mod spec;

fn main() {}
