//! The completion of an engine operation, awaitable or blocking.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::EngineError;

/// An operation in flight on a shard. `.await` it, or [`Pending::wait`] for it.
#[must_use = "an engine operation reports its outcome only through its Pending"]
pub struct Pending<T> {
    state: State<T>,
}

enum State<T> {
    Waiting(oneshot::Receiver<Result<T, EngineError>>),
    Polling(oneshot::AsyncReceiver<Result<T, EngineError>>),
    Ready(Option<Result<T, EngineError>>),
    Taken,
}

impl<T> Pending<T> {
    pub(crate) fn channel() -> (oneshot::Sender<Result<T, EngineError>>, Pending<T>) {
        let (sender, receiver) = oneshot::channel();
        (
            sender,
            Pending {
                state: State::Waiting(receiver),
            },
        )
    }

    pub(crate) fn ready(result: Result<T, EngineError>) -> Pending<T> {
        Pending {
            state: State::Ready(Some(result)),
        }
    }

    /// Blocks the calling thread until the operation completes.
    pub fn wait(self) -> Result<T, EngineError> {
        match self.state {
            State::Waiting(receiver) => receiver.recv().unwrap_or(Err(EngineError::Closed)),
            State::Polling(receiver) => block_on(receiver).unwrap_or(Err(EngineError::Closed)),
            State::Ready(result) => result.unwrap_or(Err(EngineError::Closed)),
            State::Taken => Err(EngineError::Closed),
        }
    }
}

/// Blocks on a future that is woken by another thread: a future that was polled
/// once and then waited for synchronously.
fn block_on<F: Future + Unpin>(mut future: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl std::task::Wake for ThreadWaker {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(ThreadWaker(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = Pin::new(&mut future).poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

impl<T: Unpin> Future for Pending<T> {
    type Output = Result<T, EngineError>;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let State::Waiting(_) = this.state
            && let State::Waiting(receiver) = std::mem::replace(&mut this.state, State::Taken)
        {
            this.state = State::Polling(std::future::IntoFuture::into_future(receiver));
        }
        match &mut this.state {
            State::Polling(receiver) => match Pin::new(receiver).poll(context) {
                Poll::Ready(result) => Poll::Ready(result.unwrap_or(Err(EngineError::Closed))),
                Poll::Pending => Poll::Pending,
            },
            State::Ready(result) => Poll::Ready(result.take().unwrap_or(Err(EngineError::Closed))),
            State::Waiting(_) | State::Taken => Poll::Ready(Err(EngineError::Closed)),
        }
    }
}
