//! psync backend: a small pool of threads doing pread/pwrite, for hosts where io_uring is
//! refused (Docker's default seccomp profile, `kernel.io_uring_disabled`).
//!
//! The queue keeps ownership of every buffer in its in-flight table; workers receive only the
//! raw address and length, and report completion by slot. Each queue has its own workers, so
//! queues stay independent per core.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded};

use super::{RawOp, Reaped};
use crate::error::{Error, Result};
use crate::op::OpKind;

struct Job {
    slot: u32,
    op: OpKind,
    offset: u64,
    len: u64,
    /// Address of the buffer (arena memory the queue keeps alive until this job's completion
    /// is reaped). Carried as an integer: the job crosses threads, the ownership does not.
    addr: usize,
    /// A caller's file (`-1`: the queue's own), open until this job's completion is reaped.
    fd: i32,
}

pub(crate) struct PsyncQueue {
    tx: Option<Sender<Job>>,
    rx: Receiver<Reaped>,
    workers: Vec<JoinHandle<()>>,
    abandoned: bool,
}

impl PsyncQueue {
    pub fn new(file: File, depth: u32, threads: u32) -> std::io::Result<PsyncQueue> {
        let file = Arc::new(file);
        let (tx, jobs) = bounded::<Job>(depth as usize);
        let (done, rx) = bounded::<Reaped>(depth as usize);
        let mut workers = Vec::new();
        for i in 0..threads.min(depth) {
            let (file, jobs, done) = (Arc::clone(&file), jobs.clone(), done.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("rio-psync-{i}"))
                    .spawn(move || {
                        for job in jobs.iter() {
                            let res = run(&file, &job);
                            if done.send(Reaped::ok(job.slot, res)).is_err() {
                                break;
                            }
                        }
                    })?,
            );
        }
        Ok(PsyncQueue {
            tx: Some(tx),
            rx,
            workers,
            abandoned: false,
        })
    }

    #[inline]
    pub fn push(&mut self, slot: u32, op: &RawOp) -> Result<()> {
        let job = Job {
            slot,
            op: op.op,
            offset: op.offset,
            len: op.len,
            addr: op.addr as usize,
            fd: op.fd,
        };
        // The channel holds `depth` jobs and the queue never has more than `depth` in flight,
        // so this does not block.
        self.tx
            .as_ref()
            .expect("sender lives until drop")
            .send(job)
            .map_err(|_| Error::BackendUnavailable {
                backend: "psync",
                reason: "worker threads exited".into(),
            })
    }

    #[inline]
    pub fn reap(
        &mut self,
        want: u32,
        timeout: Option<Duration>,
        out: &mut Vec<Reaped>,
    ) -> Result<bool> {
        let start = out.len();
        loop {
            match self.rx.try_recv() {
                Ok(r) => out.push(r),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(workers_gone()),
            }
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        while ((out.len() - start) as u32) < want {
            let r = match deadline {
                Some(d) => match self.rx.recv_deadline(d) {
                    Ok(r) => r,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Ok(true),
                    Err(_) => return Err(workers_gone()),
                },
                None => self.rx.recv().map_err(|_| workers_gone())?,
            };
            out.push(r);
        }
        Ok(false)
    }

    pub fn abandon(&mut self) {
        self.abandoned = true;
    }
}

fn workers_gone() -> Error {
    Error::BackendUnavailable {
        backend: "psync",
        reason: "worker threads exited".into(),
    }
}

fn run(file: &File, job: &Job) -> i32 {
    let fd = if job.fd >= 0 {
        // SAFETY: the queue's owner keeps a caller's file open until this job's completion is
        // reaped (contract of `Queue::submit_fd`), which is after this call returns.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(job.fd) }
    } else {
        file.as_fd()
    };
    let errno = |e: std::io::Error| -e.raw_os_error().unwrap_or(libc::EIO);
    let mut done: u64 = 0;
    match job.op {
        OpKind::Read | OpKind::Write => {
            while done < job.len {
                let ptr = (job.addr + done as usize) as *mut u8;
                let left = (job.len - done) as usize;
                let off = job.offset + done;
                let r = if job.op == OpKind::Read {
                    // SAFETY: [addr, addr+len) is arena memory owned by a buffer the queue holds
                    // in its in-flight table until this job's completion is reaped; nobody else
                    // touches it meanwhile.
                    unsafe { rio_sys::io::pread_raw(fd, ptr, left, off) }
                } else {
                    // SAFETY: as above, and the memory is only read.
                    unsafe { rio_sys::io::pwrite_raw(fd, ptr, left, off) }
                };
                match r {
                    Ok(0) => break, // end of file: reported as a short transfer
                    Ok(n) => done += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return errno(e),
                }
            }
            done as i32
        }
        OpKind::Flush => rio_sys::io::fdatasync(fd).map_or_else(errno, |_| 0),
        OpKind::WriteZeroes => rio_sys::io::fallocate(
            fd,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            job.offset,
            job.len,
        )
        .map_or_else(errno, |_| 0),
        OpKind::Deallocate => rio_sys::io::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            job.offset,
            job.len,
        )
        .map_or_else(errno, |_| 0),
    }
}

impl Drop for PsyncQueue {
    fn drop(&mut self) {
        // Closing the job channel ends the workers once they finish what they hold.
        drop(self.tx.take());
        if self.abandoned {
            return; // a stuck worker must not hang the caller; its memory is leaked
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
