//! Behaviour of the streaming pieces: rows as they arrive, incremental
//! writers, relays, edge-case shapes, storage values, and error mapping.

use bytes::Bytes;
use vlm_tensor::*;

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.5 - 3.0).collect()
}

#[test]
fn each_push_yields_exactly_that_chunks_rows() {
    // 10 rows of 4 f32 = 16 bytes per row; 48-byte budget = 3 rows per chunk.
    let values = ramp(40);
    let chunker = TensorChunker::new(&values[..], &[10, 4], WireDType::F32, 48).unwrap();
    assert_eq!(chunker.rows_per_chunk(), 3);
    assert_eq!(chunker.header().chunk_rows, 3);
    let mut a = TensorAssembler::new(TensorLimits::default());
    let mut seen = Vec::new();
    for (i, chunk) in chunker.enumerate() {
        let block = a.push(&chunk).unwrap();
        // The block is usable now, before any later chunk exists.
        let first = i * 3;
        let rows = 3.min(10 - first);
        assert_eq!(
            (block.seq, block.first_row, block.rows, block.row_len),
            (i as u64, first, rows, 4)
        );
        assert_eq!(block.values, values[first * 4..(first + rows) * 4]);
        assert_eq!(a.is_complete(), i == 3);
        seen.push(block.rows);
    }
    assert_eq!(seen, [3, 3, 3, 1]);
    assert_eq!(a.finish().unwrap().shape(), &[10, 4]);
}

#[test]
fn projector_style_pipeline_emits_output_per_input_chunk() {
    // Input [7, 3] -> output [7, 2] computed row-wise, one output chunk per
    // input chunk, in lockstep.
    let input = ramp(21);
    let mut rx = TensorAssembler::new(TensorLimits::default());
    let mut writer: Option<TensorStreamWriter> = None;
    let mut out_rx = TensorAssembler::new(TensorLimits::default());
    for chunk in TensorChunker::new(input.clone(), &[7, 3], WireDType::F32, 24).unwrap() {
        let block = rx.push(&chunk).unwrap();
        let meta = rx.meta().unwrap();
        let w = writer.get_or_insert_with(|| {
            TensorStreamWriter::new(
                &[meta.rows(), 2],
                WireDType::BF16,
                chunk.header.as_ref().unwrap().chunk_rows,
            )
            .unwrap()
        });
        let out: Vec<f32> = block
            .values
            .chunks(3)
            .flat_map(|r| [r[0] + r[1], r[2] * 2.0])
            .collect();
        let out_chunk = w.write_rows(&out).unwrap();
        assert_eq!(out_chunk.seq, block.seq);
        let got = out_rx.push(&out_chunk).unwrap();
        assert_eq!(got.first_row, block.first_row);
        assert_eq!(got.rows, block.rows);
    }
    let w = writer.unwrap();
    w.finish().unwrap();
    assert!(out_rx.finish().is_ok());
}

#[test]
fn writer_rejects_partial_rows_overflow_and_early_finish() {
    let mut w = TensorStreamWriter::new(&[2, 3], WireDType::F32, 1).unwrap();
    assert!(matches!(
        w.write_rows(&[1.0, 2.0]),
        Err(TensorError::PartialRowValues { len: 2, row_len: 3 })
    ));
    assert!(matches!(
        w.write_rows(&[]),
        Err(TensorError::EmptyChunk { seq: 0 })
    ));
    let c = w.write_rows(&[1.0, 2.0, 3.0]).unwrap();
    assert!(c.header.is_some());
    assert!(matches!(
        w.finish(),
        Err(TensorError::Incomplete {
            received: 12,
            total: 24
        })
    ));
    assert!(matches!(
        w.write_rows(&[0.0; 6]),
        Err(TensorError::TooManyRows {
            rows: 2,
            remaining: 1,
            ..
        })
    ));
    let c = w.write_rows(&[4.0, 5.0, 6.0]).unwrap();
    assert!(c.header.is_none());
    assert!(w.is_complete());
    assert!(w.write_rows(&[0.0; 3]).is_err());
}

#[test]
fn relay_concatenates_verified_streams_without_recoding() {
    // Two images' embeddings [2,4] and [3,4] become one [5,4] stream.
    let a = ramp(8);
    let b: Vec<f32> = ramp(12).into_iter().map(|x| -x).collect();
    let mut w = TensorStreamWriter::new(&[5, 4], WireDType::F16, 2).unwrap();
    let mut out = Vec::new();
    for (values, rows) in [(&a, 2), (&b, 3)] {
        let mut check = TensorAssembler::new(TensorLimits::default());
        for c in TensorChunker::new(&values[..], &[rows, 4], WireDType::F16, 8).unwrap() {
            check.verify(&c).unwrap();
            out.push(w.write_encoded(c.data.clone(), c.crc32c).unwrap());
        }
    }
    w.finish().unwrap();
    let t = collect_chunks(&out, &TensorLimits::default()).unwrap();
    assert_eq!(t.shape, [5, 4]);
    let want: Vec<f32> = a
        .iter()
        .chain(&b)
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(t.values, want);
    // A relayed chunk in the wrong row size is refused.
    let mut w = TensorStreamWriter::new(&[1, 4], WireDType::F16, 1).unwrap();
    assert!(matches!(
        w.write_encoded(Bytes::from_static(&[0; 6]), 0),
        Err(TensorError::PartialRow { .. })
    ));
}

#[test]
fn empty_tensors_travel_as_one_header_chunk() {
    for shape in [vec![0usize, 8], vec![3, 0], vec![0]] {
        let cs: Vec<_> = TensorChunker::new(Vec::<f32>::new(), &shape, WireDType::F32, 64)
            .unwrap()
            .collect();
        assert_eq!(cs.len(), 1, "{shape:?}");
        assert!(cs[0].data.is_empty() && cs[0].header.is_some());
        let t = collect_chunks(&cs, &TensorLimits::default()).unwrap();
        assert_eq!(t.shape, shape);
        assert!(t.values.is_empty());
        // Anything after the single chunk is too much.
        let mut extra = cs[0].clone();
        extra.seq = 1;
        extra.header = None;
        let mut a = TensorAssembler::new(TensorLimits::default());
        a.push(&cs[0]).unwrap();
        assert!(matches!(
            a.push(&extra),
            Err(TensorError::TooManyBytes { .. })
        ));
    }
    let mut w = TensorStreamWriter::new(&[0, 5], WireDType::F32, 0).unwrap();
    assert!(w.write_rows(&[]).unwrap().header.is_some());
    w.finish().unwrap();
}

#[test]
fn oversized_row_goes_alone_in_its_chunk() {
    let values = ramp(3 * 100);
    let cs: Vec<_> = TensorChunker::new(&values[..], &[3, 100], WireDType::F32, 10)
        .unwrap()
        .collect();
    assert_eq!(cs.len(), 3);
    assert!(cs.iter().all(|c| c.data.len() == 400));
}

#[test]
fn malformed_streams_name_the_problem() {
    let values = ramp(12);
    let cs: Vec<_> = TensorChunker::new(&values[..], &[3, 4], WireDType::F32, 16)
        .unwrap()
        .collect();
    let limits = TensorLimits::default();

    let mut no_header = cs[0].clone();
    no_header.header = None;
    let err = TensorAssembler::new(limits).push(&no_header).unwrap_err();
    assert_eq!(err, TensorError::MissingHeader { seq: 0 });
    assert!(err.to_string().contains("first chunk"), "{err}");

    let mut a = TensorAssembler::new(limits);
    a.push(&cs[0]).unwrap();
    let mut second_header = cs[1].clone();
    second_header.header = cs[0].header.clone();
    assert_eq!(
        a.push(&second_header).unwrap_err(),
        TensorError::UnexpectedHeader { seq: 1 }
    );

    let mut partial = cs[1].clone();
    partial.data = cs[1].data.slice(..10);
    partial.crc32c = crc32c::crc32c(&partial.data);
    assert_eq!(
        a.push(&partial).unwrap_err(),
        TensorError::PartialRow {
            seq: 1,
            len: 10,
            row_bytes: 16
        }
    );

    let mut empty = cs[1].clone();
    empty.data = Bytes::new();
    empty.crc32c = 0;
    assert_eq!(
        a.push(&empty).unwrap_err(),
        TensorError::EmptyChunk { seq: 1 }
    );

    // Failed pushes changed nothing: the genuine chunks still complete it.
    a.push(&cs[1]).unwrap();
    a.push(&cs[2]).unwrap();
    a.finish().unwrap();
    assert!(matches!(
        a.push(&cs[2]),
        Err(TensorError::TooManyBytes { .. })
    ));

    for (dtype, want) in [
        (0, TensorError::UnspecifiedDType),
        (42, TensorError::UnknownDType(42)),
    ] {
        let mut c = cs[0].clone();
        c.header.as_mut().unwrap().dtype = dtype;
        assert_eq!(TensorAssembler::new(limits).push(&c).unwrap_err(), want);
    }
    let mut c = cs[0].clone();
    c.header.as_mut().unwrap().shape.clear();
    assert_eq!(
        TensorAssembler::new(limits).push(&c).unwrap_err(),
        TensorError::EmptyShape
    );

    assert_eq!(
        TensorAssembler::new(limits).finish().unwrap_err(),
        TensorError::Empty
    );
    for e in [
        TensorError::Empty,
        TensorError::EmptyShape,
        TensorError::UnspecifiedDType,
    ] {
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
    }
}

#[test]
fn rank_and_overflow_limits() {
    let limits = TensorLimits {
        max_rank: 3,
        ..TensorLimits::default()
    };
    let header = |shape: Vec<u64>| TensorChunk {
        seq: 0,
        data: Bytes::new(),
        crc32c: 0,
        header: Some(TensorHeader {
            layout: None,
            dtype: WireDType::F32.to_proto() as i32,
            shape,
            total_bytes: 0,
            chunk_rows: 1,
        }),
    };
    let err = TensorAssembler::new(limits)
        .push(&header(vec![1; 4]))
        .unwrap_err();
    assert_eq!(err, TensorError::RankTooLarge { rank: 4, max: 3 });
    assert!(err.is_limit());
    let err = TensorAssembler::new(limits)
        .push(&header(vec![u64::MAX, 2]))
        .unwrap_err();
    assert!(matches!(err, TensorError::ShapeOverflow { .. }));
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::ResourceExhausted
    );
    // A zero dimension does not hide an overflowing row count.
    let err = TensorAssembler::new(limits)
        .push(&header(vec![u64::MAX, 2, 0]))
        .unwrap_err();
    assert!(matches!(err, TensorError::ShapeOverflow { .. }));
}

#[test]
fn chunker_rejects_shape_value_mismatch() {
    let err = TensorChunker::new(vec![0.0f32; 5], &[2, 3], WireDType::F32, 0).unwrap_err();
    assert_eq!(
        err,
        TensorError::ShapeMismatch {
            shape: vec![2, 3],
            expected: 6,
            actual: 5
        }
    );
    assert!(TensorChunker::new(vec![0.0f32; 0], &[], WireDType::F32, 0).is_err());
}

#[test]
fn stored_value_rejects_any_corruption() {
    let v = TensorValue::from_f32(&ramp(24), &[4, 6], WireDType::BF16).unwrap();
    let enc = v.encode();
    let limits = TensorLimits::default();
    assert_eq!(TensorValue::decode(enc.clone().into(), &limits).unwrap(), v);
    for i in 0..enc.len() {
        for bit in [0u8, 3, 7] {
            let mut bad = enc.clone();
            bad[i] ^= 1 << bit;
            match TensorValue::decode(bad.into(), &limits) {
                Err(_) => {}
                Ok(got) => panic!("flip at byte {i} bit {bit} accepted as {:?}", got.meta()),
            }
        }
    }
    for len in 0..enc.len() {
        assert!(
            TensorValue::decode(Bytes::copy_from_slice(&enc[..len]), &limits).is_err(),
            "truncated to {len}"
        );
    }
    let mut longer = enc.clone();
    longer.push(0);
    assert!(TensorValue::decode(longer.into(), &limits).is_err());
    let small = TensorLimits {
        max_total_bytes: 10,
        ..limits
    };
    assert!(matches!(
        TensorValue::decode(enc.into(), &small),
        Err(TensorError::TensorTooLarge { .. })
    ));
}

#[test]
fn value_builder_tees_a_verified_stream() {
    let values = ramp(30);
    let mut b = TensorValueBuilder::new(TensorLimits::default());
    for c in TensorChunker::new(&values[..], &[5, 6], WireDType::F32, 50).unwrap() {
        b.push(&c).unwrap();
    }
    let v = b.finish().unwrap();
    assert_eq!(v.to_f32().values, values);
    let mut b = TensorValueBuilder::new(TensorLimits::default());
    let first = TensorChunker::new(&values[..], &[5, 6], WireDType::F32, 50)
        .unwrap()
        .next()
        .unwrap();
    b.push(&first).unwrap();
    assert!(matches!(b.finish(), Err(TensorError::Incomplete { .. })));
}

#[test]
fn collect_stream_passes_stream_errors_through() {
    let values = ramp(8);
    let cs: Vec<Result<TensorChunk, tonic::Status>> =
        TensorChunker::new(&values[..], &[2, 4], WireDType::F32, 16)
            .unwrap()
            .map(Ok)
            .collect();
    let t = futures::executor::block_on(collect_stream(
        futures::stream::iter(cs.clone()),
        &TensorLimits::default(),
    ))
    .unwrap();
    assert_eq!(t.values, values);

    let mut broken = cs.clone();
    broken.insert(1, Err(tonic::Status::unavailable("encoder went away")));
    let err = futures::executor::block_on(collect_stream(
        futures::stream::iter(broken),
        &TensorLimits::default(),
    ))
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);

    let truncated = cs[..1].to_vec();
    let err = futures::executor::block_on(collect_stream(
        futures::stream::iter(truncated),
        &TensorLimits::default(),
    ))
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("ended after 16 of 32 bytes"),
        "{}",
        err.message()
    );
}

#[test]
fn wire_dtype_names_and_proto_values() {
    for d in [WireDType::F32, WireDType::F16, WireDType::BF16] {
        assert_eq!(d.name().parse::<WireDType>().unwrap(), d);
        assert_eq!(WireDType::from_proto(d.to_proto() as i32).unwrap(), d);
    }
    assert!("f64".parse::<WireDType>().is_err());
    assert_eq!(
        WireDType::from_proto_or(0, WireDType::BF16).unwrap(),
        WireDType::BF16
    );
    assert!(WireDType::from_proto_or(9, WireDType::BF16).is_err());
}
