//! Compiles `proto/gateway/v1/*.proto` with protox (a pure-Rust protobuf compiler),
//! so a build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/gateway/v1/device.proto",
        "proto/gateway/v1/uplink.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .enable_type_names()
        .compile_fds(descriptors)?;
    Ok(())
}
