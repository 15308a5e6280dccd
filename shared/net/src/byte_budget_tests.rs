use super::*;
use std::time::Duration;

const UNIT: u64 = 1024;

fn waiting(b: &ByteBudget) -> usize {
    b.lock().waiting.len()
}

#[tokio::test]
async fn reservations_are_bounded_by_the_budget_and_given_back_on_drop() {
    let b = ByteBudget::new("test.Budget", 10 * UNIT, 4);
    let a = b.reserve(6 * UNIT, "a", None).await.unwrap();
    assert_eq!(b.used(), 6 * UNIT);
    let e = b.empty().try_grow(5 * UNIT, "b").unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("b needs"), "{}", e.message());
    drop(a);
    assert_eq!(b.used(), 0);
    let mut c = b.empty();
    c.try_grow(10 * UNIT, "c").unwrap();
    assert_eq!(c.bytes(), 10 * UNIT);
}

#[tokio::test]
async fn a_reservation_larger_than_the_budget_is_refused_at_once() {
    let b = ByteBudget::new("test.Budget", 10 * UNIT, 4);
    let started = std::time::Instant::now();
    let e = b.reserve(11 * UNIT, "the image", None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message().contains("whole memory budget"),
        "{}",
        e.message()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_waiting_reservation_gets_room_when_it_is_freed() {
    let b = ByteBudget::new("test.Budget", 10 * UNIT, 4);
    let a = b.reserve(8 * UNIT, "a", None).await.unwrap();
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { b2.reserve(5 * UNIT, "w", None).await });
    // The waiter is queued (not refused) while `a` holds the room.
    tokio::task::yield_now().await;
    while waiting(&b) == 0 {
        tokio::task::yield_now().await;
    }
    assert!(!waiter.is_finished());
    drop(a);
    let w = waiter.await.unwrap().unwrap();
    assert_eq!(w.bytes(), 5 * UNIT);
}

#[tokio::test]
async fn waits_end_at_the_deadline_and_the_queue_is_bounded() {
    let b = ByteBudget::new("test.Budget", 10 * UNIT, 1);
    let _a = b.reserve(10 * UNIT, "a", None).await.unwrap();
    let at = Instant::now() + Duration::from_millis(50);
    let e = b.reserve(UNIT, "late", Some(at)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    // One waiter allowed: the second is refused at once.
    let b2 = b.clone();
    let first = tokio::spawn(async move { b2.reserve(UNIT, "first", None).await });
    while waiting(&b) == 0 {
        tokio::task::yield_now().await;
    }
    let e = b.reserve(UNIT, "second", None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("more waiting"), "{}", e.message());
    first.abort();
}

#[tokio::test]
async fn a_running_request_grows_before_waiting_ones_and_waiters_hold_nothing() {
    let b = ByteBudget::new("test.Budget", 10 * UNIT, 4);
    let mut running = b.reserve(6 * UNIT, "running", None).await.unwrap();
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { b2.reserve(6 * UNIT, "newcomer", None).await });
    while waiting(&b) == 0 {
        tokio::task::yield_now().await;
    }
    // The newcomer waits for all of its 6 units and holds none of the 4 free ones.
    assert_eq!(b.used(), 6 * UNIT);
    running.try_grow(3 * UNIT, "more").unwrap();
    drop(running);
    let w = waiter.await.unwrap().unwrap();
    assert_eq!(b.used(), 6 * UNIT);
    drop(w);
    assert_eq!(b.used(), 0);
}

#[tokio::test]
async fn a_waiter_that_goes_away_leaves_the_queue() {
    let b = ByteBudget::new("test.Budget", 10 * UNIT, 4);
    let a = b.reserve(10 * UNIT, "a", None).await.unwrap();
    let b2 = b.clone();
    let gone = tokio::spawn(async move { b2.reserve(5 * UNIT, "gone", None).await });
    while waiting(&b) == 0 {
        tokio::task::yield_now().await;
    }
    gone.abort();
    let _ = gone.await;
    assert_eq!(waiting(&b), 0);
    drop(a);
    assert_eq!(b.used(), 0);
}

#[tokio::test]
async fn growing_never_waits() {
    let b = ByteBudget::new("test.Budget", 10 * UNIT, 4);
    let mut p = b.empty();
    p.try_grow(4 * UNIT, "chunk").unwrap();
    p.try_grow(6 * UNIT, "chunk").unwrap();
    assert_eq!(p.bytes(), 10 * UNIT);
    assert_eq!(
        p.try_grow(1, "chunk").unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
    drop(p);
    assert_eq!(b.used(), 0);
}
