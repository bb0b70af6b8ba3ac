//! Dynamic batching: gather jobs into a batch of at most `max`, waiting at most `max_delay` after
//! the first (Triton's dynamic batcher, without the priority levels).

use std::time::Duration;

use tokio::sync::mpsc;

/// Waits for one item, then gathers more until `max` items or `max_delay` after the first.
/// `None` when the channel is closed and empty.
pub async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    max: usize,
    max_delay: Duration,
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
    if batch.len() >= max || max_delay.is_zero() {
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
        let batch = next_batch(&mut rx, 4, Duration::from_secs(10)).await;
        assert_eq!(batch, Some(vec![0, 1, 2, 3]));
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(next_batch(&mut rx, 4, Duration::ZERO).await, Some(vec![4]));
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
        let batch = next_batch(&mut rx, 8, Duration::from_millis(5)).await;
        assert_eq!(batch, Some(vec![1, 2]));
        assert_eq!(started.elapsed(), Duration::from_millis(5));
        assert_eq!(
            next_batch(&mut rx, 8, Duration::from_millis(5)).await,
            Some(vec![3])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_channel_ends_batching_after_the_last_items() {
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(7).await.expect("open");
        drop(tx);
        assert_eq!(
            next_batch(&mut rx, 8, Duration::from_secs(1)).await,
            Some(vec![7])
        );
        assert_eq!(next_batch(&mut rx, 8, Duration::from_secs(1)).await, None);
    }
}
