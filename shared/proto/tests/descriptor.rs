//! The protos are the public contract other languages generate from, so the
//! descriptor set must be complete and every element must carry documentation.

use std::collections::HashMap;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};

const VLM_FILES: [&str; 5] = [
    "vlm/v1/tensor.proto",
    "vlm/v1/encoder.proto",
    "vlm/v1/projector.proto",
    "vlm/v1/decoder.proto",
    "vlm/v1/gateway.proto",
];

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(vlm_proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn vlm_files(fds: &FileDescriptorSet) -> Vec<&FileDescriptorProto> {
    fds.file
        .iter()
        .filter(|f| f.name().starts_with("vlm/v1/"))
        .collect()
}

#[test]
fn descriptor_set_holds_every_file_and_service() {
    let fds = descriptor_set();
    let names: Vec<&str> = vlm_files(&fds).iter().map(|f| f.name()).collect();
    for f in VLM_FILES {
        assert!(
            names.contains(&f),
            "{f} missing from descriptor set: {names:?}"
        );
    }
    let services: Vec<String> = vlm_files(&fds)
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| format!("{}.{}", f.package(), s.name()))
        })
        .collect();
    for s in [
        "vlm.v1.Encoder",
        "vlm.v1.Projector",
        "vlm.v1.Decoder",
        "vlm.v1.Gateway",
    ] {
        assert!(services.iter().any(|x| x == s), "{s} missing: {services:?}");
    }
    // The generated servers must agree with the descriptor names, or
    // reflection and health checks would advertise services nobody serves.
    assert_eq!(vlm_proto::encoder_server::SERVICE_NAME, "vlm.v1.Encoder");
    assert_eq!(
        vlm_proto::projector_server::SERVICE_NAME,
        "vlm.v1.Projector"
    );
    assert_eq!(vlm_proto::decoder_server::SERVICE_NAME, "vlm.v1.Decoder");
    assert_eq!(vlm_proto::gateway_server::SERVICE_NAME, "vlm.v1.Gateway");
}

/// METHOD_PATHS lists each RPC of each service once, in gRPC's `/package.Service/Method` form.
#[test]
fn method_paths_name_every_rpc() {
    let fds = descriptor_set();
    let rpcs: usize = vlm_files(&fds)
        .iter()
        .flat_map(|f| &f.service)
        .map(|s| s.method.len())
        .sum();
    assert_eq!(vlm_proto::METHOD_PATHS.len(), rpcs);
    for path in [
        "/vlm.v1.Gateway/Generate",
        "/vlm.v1.Gateway/GetModelInfo",
        "/vlm.v1.Encoder/Encode",
        "/vlm.v1.Decoder/Generate",
        "/vlm.v1.Projector/Project",
    ] {
        assert!(vlm_proto::METHOD_PATHS.contains(&path), "{path}");
    }
    for path in [
        "/vlm.v1.Gateway/Generate",
        "/vlm.v1.Encoder/Encode",
        "/vlm.v1.Decoder/Info",
    ] {
        assert!(vlm_proto::UNARY_REQUEST_PATHS.contains(&path), "{path}");
    }
    for path in ["/vlm.v1.Decoder/Generate", "/vlm.v1.Projector/Project"] {
        assert!(!vlm_proto::UNARY_REQUEST_PATHS.contains(&path), "{path}");
    }
}

/// Collects (path, human-readable element name) for every documentable element.
fn elements(file: &FileDescriptorProto) -> Vec<(Vec<i32>, String)> {
    fn message(
        out: &mut Vec<(Vec<i32>, String)>,
        path: Vec<i32>,
        m: &DescriptorProto,
        scope: &str,
    ) {
        let name = format!("{scope}.{}", m.name());
        out.push((path.clone(), format!("message {name}")));
        for (i, f) in m.field.iter().enumerate() {
            let mut p = path.clone();
            p.extend([2, i as i32]);
            out.push((p, format!("field {name}.{}", f.name())));
        }
        for (i, o) in m.oneof_decl.iter().enumerate() {
            // proto3 `optional` fields are synthetic oneofs named `_field`;
            // the field comment documents them.
            if o.name().starts_with('_') {
                continue;
            }
            let mut p = path.clone();
            p.extend([8, i as i32]);
            out.push((p, format!("oneof {name}.{}", o.name())));
        }
        for (i, n) in m.nested_type.iter().enumerate() {
            // A `map<K, V>` field's entry message is synthetic; the field comment documents it.
            if n.options.as_ref().is_some_and(|o| o.map_entry()) {
                continue;
            }
            let mut p = path.clone();
            p.extend([3, i as i32]);
            message(out, p, n, &name);
        }
        for (i, e) in m.enum_type.iter().enumerate() {
            let mut p = path.clone();
            p.extend([4, i as i32]);
            enumeration(out, p, e, &name);
        }
    }
    fn enumeration(
        out: &mut Vec<(Vec<i32>, String)>,
        path: Vec<i32>,
        e: &EnumDescriptorProto,
        scope: &str,
    ) {
        let name = format!("{scope}.{}", e.name());
        out.push((path.clone(), format!("enum {name}")));
        for (i, v) in e.value.iter().enumerate() {
            let mut p = path.clone();
            p.extend([2, i as i32]);
            out.push((p, format!("enum value {name}.{}", v.name())));
        }
    }
    let mut out = Vec::new();
    let pkg = file.package();
    for (i, m) in file.message_type.iter().enumerate() {
        message(&mut out, vec![4, i as i32], m, pkg);
    }
    for (i, e) in file.enum_type.iter().enumerate() {
        enumeration(&mut out, vec![5, i as i32], e, pkg);
    }
    for (i, s) in file.service.iter().enumerate() {
        let name = format!("{pkg}.{}", s.name());
        out.push((vec![6, i as i32], format!("service {name}")));
        for (j, m) in s.method.iter().enumerate() {
            out.push((
                vec![6, i as i32, 2, j as i32],
                format!("rpc {name}.{}", m.name()),
            ));
        }
    }
    out
}

#[test]
fn every_element_is_documented() {
    let fds = descriptor_set();
    let mut undocumented = Vec::new();
    let mut checked = 0;
    for file in vlm_files(&fds) {
        let info = file
            .source_code_info
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no source info", file.name()));
        let comments: HashMap<&[i32], &str> = info
            .location
            .iter()
            .map(|l| (l.path.as_slice(), l.leading_comments()))
            .collect();
        for (path, what) in elements(file) {
            checked += 1;
            if comments
                .get(path.as_slice())
                .is_none_or(|c| c.trim().is_empty())
            {
                undocumented.push(format!("{}: {what}", file.name()));
            }
        }
    }
    assert!(
        checked > 80,
        "walked only {checked} elements; the walker is broken"
    );
    assert!(
        undocumented.is_empty(),
        "undocumented proto elements:\n{}",
        undocumented.join("\n")
    );
}

#[test]
fn tensor_chunk_round_trips_with_bytes_payload() {
    let chunk = vlm_proto::TensorChunk {
        seq: 0,
        data: prost::bytes::Bytes::from_static(&[1, 2, 3, 4]),
        crc32c: 7,
        header: Some(vlm_proto::TensorHeader {
            layout: None,
            dtype: vlm_proto::DType::DtypeF32 as i32,
            shape: vec![1, 1],
            total_bytes: 4,
            chunk_rows: 1,
        }),
    };
    let back = vlm_proto::TensorChunk::decode(chunk.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back, chunk);
}
