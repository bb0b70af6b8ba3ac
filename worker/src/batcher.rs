//! Dynamic batching: gather jobs into a batch of at most `max`, waiting at most `max_delay` after
//! the first (Triton's dynamic batcher, without the priority levels) — but only while more jobs
//! are on their way: a lone job on an idle worker runs at once instead of paying the delay.

use std::time::Duration;

use tokio::sync::mpsc;

/// Waits for one item, then gathers more until `max` items or `max_delay` after the first;
/// stops waiting early when `more_coming()` says no further item is on its way.
/// `None` when the channel is closed and empty.
pub async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    max: usize,
    max_delay: Duration,
    more_coming: impl Fn() -> bool,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = Vec::with_capacity(max);
    batch.push(first);
    // Whatever is already waiting joins at once.
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    if batch.len() >= max || max_delay.is_zero() || !more_coming() {
        return Some(batch);
    }
    let deadline = tokio::time::sleep(max_delay);
    tokio::pin!(deadline);
    while batch.len() < max {
        tokio::select! {
            () = &mut deadline => break,
            item = rx.recv() => match item {
                Some(item) => batch.push(item),
                None => break,
            },
        }
        if !more_coming() && rx.is_empty() {
            break;
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_returns_without_waiting() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..5 {
            tx.send(i).await.expect("open");
        }
        let started = tokio::time::Instant::now();
        let batch = next_batch(&mut rx, 4, Duration::from_secs(10), || true).await;
        assert_eq!(batch, Some(vec![0, 1, 2, 3]));
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(
            next_batch(&mut rx, 4, Duration::ZERO, || true).await,
            Some(vec![4])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_a_partial_batch_after_max_delay() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(1).await.expect("open");
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            late.send(2).await.expect("open");
            tokio::time::sleep(Duration::from_millis(10)).await;
            late.send(3).await.expect("open");
        });
        let started = tokio::time::Instant::now();
        let batch = next_batch(&mut rx, 8, Duration::from_millis(5), || true).await;
        assert_eq!(batch, Some(vec![1, 2]));
        assert_eq!(started.elapsed(), Duration::from_millis(5));
        assert_eq!(
            next_batch(&mut rx, 8, Duration::from_millis(5), || true).await,
            Some(vec![3])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_channel_ends_batching_after_the_last_items() {
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(7).await.expect("open");
        drop(tx);
        assert_eq!(
            next_batch(&mut rx, 8, Duration::from_secs(1), || true).await,
            Some(vec![7])
        );
        assert_eq!(
            next_batch(&mut rx, 8, Duration::from_secs(1), || true).await,
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_job_runs_at_once_when_nothing_else_is_coming() {
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(1).await.expect("open");
        let started = tokio::time::Instant::now();
        let batch = next_batch(&mut rx, 8, Duration::from_secs(1), || false).await;
        assert_eq!(batch, Some(vec![1]));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_stops_when_the_last_job_on_its_way_has_arrived() {
        let coming = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(1));
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(1).await.expect("open");
        let late = tx.clone();
        let counter = coming.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            late.send(2).await.expect("open");
            counter.store(0, std::sync::atomic::Ordering::SeqCst);
        });
        let started = tokio::time::Instant::now();
        let batch = next_batch(&mut rx, 8, Duration::from_secs(1), || {
            coming.load(std::sync::atomic::Ordering::SeqCst) > 0
        })
        .await;
        assert_eq!(batch, Some(vec![1, 2]));
        assert_eq!(started.elapsed(), Duration::from_millis(2));
    }
}
