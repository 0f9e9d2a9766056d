//! Compiles dewy's copy of Dewy's `dewy.proto` into the server side.

fn main() {
    let proto = "../../crates/dewy-registry/proto";
    println!("cargo:rerun-if-changed={proto}/dewy.proto");
    let descriptors = match protox::compile([format!("{proto}/dewy.proto")], [proto]) {
        Ok(d) => d,
        Err(e) => panic!("dewy.proto: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(descriptors)
    {
        panic!("generating the gRPC server: {e}");
    }
}
