//! A header announcing an enormous tensor must be rejected by arithmetic
//! alone. A counting global allocator proves nothing proportional to the
//! claim is allocated. This file holds a single test so no other test thread
//! allocates concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use vlm_tensor::*;

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn hundred_gigabyte_header_is_rejected_without_allocating() {
    // [25e9, 4] f32 = 400 GB, header consistent with the shape.
    let huge = TensorHeader {
        layout: None,
        dtype: WireDType::F32.to_proto() as i32,
        shape: vec![25_000_000_000, 4],
        total_bytes: 400_000_000_000,
        chunk_rows: 1,
    };
    let data = Bytes::from_static(&[0u8; 16]);
    let chunk = TensorChunk {
        seq: 0,
        crc32c: crc32c::crc32c(&data),
        data,
        header: Some(huge.clone()),
    };
    // A header whose total_bytes lies about a small shape.
    let liar = TensorChunk {
        header: Some(TensorHeader {
            shape: vec![1, 4],
            ..huge.clone()
        }),
        ..chunk.clone()
    };
    // A shape of 100 GB with limits wide open: the lie in total_bytes alone must stop it.
    let open = TensorLimits {
        max_total_bytes: u64::MAX,
        ..TensorLimits::default()
    };
    let lying_total = TensorChunk {
        header: Some(TensorHeader {
            total_bytes: 16,
            ..huge.clone()
        }),
        ..chunk.clone()
    };

    LARGEST.store(0, Ordering::SeqCst);
    let limits = TensorLimits::default();
    let e1 = TensorAssembler::new(limits).push(&chunk).unwrap_err();
    let e2 = TensorCollector::new(limits).push(&chunk).unwrap_err();
    let e3 = TensorValueBuilder::new(limits).push(&chunk).unwrap_err();
    let e4 = TensorAssembler::new(limits).push(&liar).unwrap_err();
    let e5 = TensorCollector::new(open).push(&lying_total).unwrap_err();
    let largest = LARGEST.load(Ordering::SeqCst);

    assert!(
        largest < 64 * 1024,
        "largest allocation while rejecting was {largest} bytes"
    );
    for e in [&e1, &e2, &e3] {
        assert!(
            matches!(
                e,
                TensorError::TensorTooLarge {
                    total_bytes: 400_000_000_000,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            tonic::Status::from(e.clone()).code(),
            tonic::Code::ResourceExhausted
        );
    }
    assert!(
        matches!(
            e4,
            TensorError::TotalBytesMismatch {
                claimed: 400_000_000_000,
                expected: 16,
                ..
            }
        ),
        "{e4}"
    );
    assert!(
        matches!(e5, TensorError::TotalBytesMismatch { claimed: 16, .. }),
        "{e5}"
    );
}
