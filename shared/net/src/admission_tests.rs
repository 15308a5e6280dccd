use super::*;

fn depth(service: &'static str) -> i64 {
    MeshMetrics::global()
        .admission_queue_depth
        .get_or_create(&ServiceLabels { service })
        .get()
}

/// Calls beyond the queue are shed without ever counting as queued: the queue and its gauge
/// stay within `max_queue` however many arrive at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_calls_never_count_as_queued() {
    const SERVICE: &str = "test.QueueBound";
    let limits = AdmissionLimits {
        max_in_flight: 1,
        max_queue: 1,
    };
    let gate = AdmissionGate::new(SERVICE, limits, ByteBudget::new(SERVICE, 1 << 20, 1));
    let held = gate.admit(None).await.unwrap();
    let queued = {
        let gate = gate.clone();
        tokio::spawn(async move { gate.admit(None).await.map(|_| ()) })
    };
    while gate.shared.waiting.load(Ordering::Acquire) == 0 {
        tokio::task::yield_now().await; // until the second call is queued
    }
    let shed: Vec<_> = (0..64)
        .map(|_| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let r = gate.admit(None).await;
                (
                    r.is_err(),
                    gate.shared.waiting.load(Ordering::Acquire),
                    depth(SERVICE),
                )
            })
        })
        .collect();
    for t in shed {
        let (refused, waiting, gauge) = t.await.unwrap();
        assert!(refused);
        assert!(
            waiting <= 1 && gauge <= 1,
            "waiting {waiting}, gauge {gauge}"
        );
    }
    assert_eq!(depth(SERVICE), 1);
    drop(held);
    queued.await.unwrap().unwrap();
    assert_eq!(depth(SERVICE), 0);
}
