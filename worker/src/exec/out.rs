//! A write task's bytes on their way out. A slot computes a task's (or a group's) bytes into
//! its buffers and hands them over as [`Writes`]; [`Executor::write_out`] writes them, every
//! part at once, and completes the results with the parts' receipts. The slot loop (`pull`)
//! lets the writes of one group run while it computes the next, so that neither the disk nor
//! the cores wait for the other.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use shardmerge_proto as pb;

use super::{fatal, rowcache, Executor, TaskError};
use crate::storage::{Storage, Upload};

type TaskResult = Result<pb::TaskResult, TaskError>;

/// What a slot computed: results that are final, or bytes still to write.
pub enum Staged {
    Done(Vec<TaskResult>),
    Writes(Writes),
}

/// Computed output parts not yet written, in the order of their tasks.
#[derive(Default)]
pub struct Writes {
    pub(super) parts: Vec<Part>,
    /// The row-cache pieces the tasks read: let go once the parts are written.
    pub(super) cached: Vec<rowcache::Key>,
}

/// One task's bytes and its result but for the part's receipt.
pub(super) struct Part {
    /// Where the bytes go (none: an audit, which writes nothing and reports the receipt of
    /// the bytes it computed).
    pub(super) out: Option<pb::OutputTarget>,
    pub(super) buf: Vec<u8>,
    pub(super) result: pb::TaskResult,
}

impl Writes {
    /// The bytes the parts hold (what a slot keeps while they are written).
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.buf.capacity() as u64).sum()
    }
}

impl Executor {
    /// Writes `w`'s parts, all at once (the store gets them as one queue of writes rather
    /// than one after another); returns each task's result, with its receipt, and the
    /// buffers the stores let go of, for the slot's next tasks.
    pub async fn write_out(&self, w: Writes) -> (Vec<TaskResult>, Vec<Vec<u8>>) {
        let puts = w.parts.into_iter().map(|p| async move {
            let Part {
                out,
                buf,
                mut result,
            } = p;
            let Some(out) = out else {
                let receipt = pb::PartReceipt {
                    part_index: 0,
                    etag: String::new(),
                    size: buf.len() as u64,
                    crc32c: crc32c::crc32c(&buf),
                };
                result.part = Some(receipt);
                return (Ok(result), Some(buf));
            };
            match self.put(&out, buf).await {
                Ok((receipt, back)) => {
                    result.part = Some(receipt);
                    (Ok(result), back)
                }
                Err(e) => (Err(e), None),
            }
        });
        let done = futures::future::join_all(puts).await;
        // the parts are written: the rows the statistics passes kept for them are not needed
        // again
        if let Some(c) = &self.cache {
            w.cached.iter().for_each(|k| c.remove(k));
        }
        let mut bufs = Vec::with_capacity(done.len());
        let results = done
            .into_iter()
            .map(|(r, back)| {
                bufs.extend(back);
                r
            })
            .collect();
        (results, bufs)
    }

    /// Writes `buf` to its output target; returns the part's receipt and the buffer, when the
    /// store let go of it.
    async fn put(
        &self,
        out: &pb::OutputTarget,
        buf: Vec<u8>,
    ) -> Result<(pb::PartReceipt, Option<Vec<u8>>), TaskError> {
        let (store, upload, part_index) = self.sink(out)?;
        let data = Bytes::from(buf);
        let receipt = store
            .write_part(&upload, part_index, out.offset, data.clone())
            .await?;
        // The store is done with the bytes: take the buffer back when nothing else holds it.
        let back = data.try_into_mut().ok().map(Vec::from);
        let receipt = pb::PartReceipt {
            part_index: receipt.part_index,
            etag: receipt.etag,
            size: receipt.size,
            crc32c: receipt.crc32c,
        };
        Ok((receipt, back))
    }

    /// The store, upload and part index an output target names.
    fn sink(&self, out: &pb::OutputTarget) -> Result<(Arc<dyn Storage>, Upload, u32), TaskError> {
        match &out.sink {
            Some(pb::output_target::Sink::Local(l)) => {
                let loc = self.resolver.resolve(&l.path, Path::new("/"))?;
                let final_path = self.resolver.resolve(&out.uri, Path::new("/"))?.path;
                Ok((
                    loc.store,
                    Upload {
                        path: final_path,
                        id: loc.path,
                    },
                    0,
                ))
            }
            Some(pb::output_target::Sink::Multipart(m)) => {
                let loc = self.resolver.resolve(&m.store, Path::new("/"))?;
                Ok((
                    loc.store,
                    Upload {
                        path: m.key.clone(),
                        id: m.upload_id.clone(),
                    },
                    m.part_index,
                ))
            }
            None => Err(fatal("output without a sink")),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    #[test]
    fn written_bytes_come_back_as_the_same_buffer() {
        // `put` hands the output to the store as `Bytes` and takes the allocation back
        // once the store has dropped its copy.
        let buf = vec![7u8; 1 << 20];
        let ptr = buf.as_ptr();
        let data = Bytes::from(buf);
        let store_copy = data.clone();
        assert!(data.clone().try_into_mut().is_err(), "still shared");
        drop(store_copy);
        let back: Vec<u8> = data.try_into_mut().expect("unique again").into();
        assert_eq!(back.as_ptr(), ptr);
        assert_eq!(back.len(), 1 << 20);
    }
}
