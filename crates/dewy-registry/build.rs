//! With feature `grpc`: compiles Dewy's `proto/dewy.proto` into the gRPC
//! client, with protox (no `protoc` needed).

fn main() {
    #[cfg(feature = "grpc")]
    {
        println!("cargo:rerun-if-changed=proto/dewy.proto");
        let descriptors = match protox::compile(["proto/dewy.proto"], ["proto"]) {
            Ok(d) => d,
            Err(e) => panic!("proto/dewy.proto: {e}"),
        };
        if let Err(e) = tonic_prost_build::configure()
            .build_server(false)
            .build_transport(true)
            .compile_fds(descriptors)
        {
            panic!("generating the gRPC client: {e}");
        }
    }
}
