//! fcopy over a VMBus channel (`shm`, `uio`): the IC framework does the framing and the
//! negotiation (framework 3.0, message 1.1, as `hv_fcopy_uio_daemon`); this adapter decodes each
//! request, runs it in the channel's [`FcopySession`] on a blocking thread (file writes and
//! `fsync` must not stall the async workers), logs every refusal once and answers its status.

use std::sync::Arc;

use hvisd_ic::service::{IcMessageInfo, IcService, IcServiceError, IcStatus};
use hvisd_protocol::fcopy::{self, FcopyOperation, FcopyRequest};
use hvisd_protocol::guid::Guid;
use hvisd_protocol::ic::{IcVersion, MessageType, status};

use super::session::{Done, FcopyOp, FcopySession};
use super::{FcopyPolicy, Refusal};

const NAME: &str = "fcopy";

/// The fcopy integration service on one channel. Dropping it (the channel closed) removes the
/// temporary file of an unfinished copy.
pub struct FcopyService {
    policy: Arc<FcopyPolicy>,
    /// `None` only while a request runs on the blocking pool.
    session: Option<FcopySession>,
}

impl FcopyService {
    /// Serves copies under `policy`.
    pub fn new(policy: Arc<FcopyPolicy>) -> Self {
        FcopyService {
            session: Some(FcopySession::new(policy.clone())),
            policy,
        }
    }
}

/// The request as the session takes it, or the refusal of one that could not be decoded.
fn decode(body: &[u8]) -> Result<FcopyOp, IcServiceError> {
    // Without a whole hv_fcopy_hdr there is no operation to answer: dropped, as Linux does.
    if body.len() < fcopy::FCOPY_HEADER_SIZE {
        return Err(IcServiceError::malformed(
            NAME,
            format!(
                "body of {} bytes is shorter than hv_fcopy_hdr ({})",
                body.len(),
                fcopy::FCOPY_HEADER_SIZE
            ),
        ));
    }
    Ok(match FcopyRequest::parse(body) {
        Ok(FcopyRequest::Start(start)) => FcopyOp::Start(start),
        Ok(FcopyRequest::Write { offset, data }) => FcopyOp::Write {
            offset,
            data: data.to_vec(),
        },
        Ok(FcopyRequest::Complete) => FcopyOp::Complete,
        Ok(FcopyRequest::Cancel) => FcopyOp::Cancel,
        Ok(FcopyRequest::Unknown(operation)) => FcopyOp::Refused {
            operation,
            refusal: Refusal::fail(format!("unknown operation {operation}")),
        },
        Err(e) => {
            let operation = header_operation(body);
            FcopyOp::Refused {
                operation,
                refusal: Refusal::invalid(format!("{operation}: {e}")),
            }
        }
    })
}

/// The operation a body's header names (`u32::MAX` if there is no whole header).
fn header_operation(body: &[u8]) -> FcopyOperation {
    use zerocopy::FromBytes;
    fcopy::FcopyHeader::read_from_prefix(body)
        .map(|(header, _)| FcopyOperation(header.operation.get()))
        .unwrap_or(FcopyOperation(u32::MAX))
}

impl IcService for FcopyService {
    fn name(&self) -> &'static str {
        NAME
    }

    fn class_id(&self) -> Guid {
        fcopy::CLASS_ID
    }

    fn framework_versions(&self) -> &'static [IcVersion] {
        fcopy::FRAMEWORK_VERSIONS
    }

    fn message_versions(&self) -> &'static [IcVersion] {
        fcopy::MESSAGE_VERSIONS
    }

    async fn handle(
        &mut self,
        info: IcMessageInfo,
        body: &mut [u8],
    ) -> Result<IcStatus, IcServiceError> {
        info.expect_type(NAME, MessageType::FCOPY)?;
        let op = decode(body)?;
        let operation = match &op {
            FcopyOp::Start(_) => FcopyOperation::START_FILE_COPY,
            FcopyOp::Write { .. } => FcopyOperation::WRITE_TO_FILE,
            FcopyOp::Complete => FcopyOperation::COMPLETE_FCOPY,
            FcopyOp::Cancel => FcopyOperation::CANCEL_FCOPY,
            FcopyOp::Refused { operation, .. } => *operation,
        };
        let mut session = self
            .session
            .take()
            .unwrap_or_else(|| FcopySession::new(self.policy.clone()));
        // If the channel closes meanwhile this future is dropped; the session then ends with
        // the blocking task, and its drop removes any temporary file.
        let (session, result) = tokio::task::spawn_blocking(move || {
            let result = session.apply(op);
            (session, result)
        })
        .await
        .map_err(|e| IcServiceError::Failed {
            service: NAME,
            reason: format!("{operation} did not finish: {e}"),
        })?;
        self.session = Some(session);
        match result {
            Ok(done) => {
                log_done(&done);
                Ok(status::HV_S_OK)
            }
            Err(refusal) => {
                hvisd_protocol::throttled!(
                    warn,
                    %operation,
                    status = status::name(refusal.status).unwrap_or("HV_E_FAIL"),
                    "fcopy refused: {refusal}"
                );
                Ok(refusal.status)
            }
        }
    }
}

fn log_done(done: &Done) {
    match done {
        Done::Started {
            path,
            created_dirs,
            replaced,
        } => {
            if *replaced {
                hvisd_protocol::throttled!(
                    warn,
                    "fcopy: a new copy replaced an unfinished one (its partial file was removed)"
                );
            }
            hvisd_protocol::throttled!(info, path = %path, created_dirs, "fcopy: copy started");
        }
        Done::Written => {}
        Done::Completed { path, bytes } => {
            hvisd_protocol::throttled!(info, path = %path, bytes, "fcopy: file copied");
        }
        Done::Cancelled { had_copy } => {
            hvisd_protocol::throttled!(info, had_copy, "fcopy: copy cancelled by the host");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvisd_protocol::fcopy::{CopyFlags, StartFcopy};

    #[test]
    fn undecodable_requests_become_refusals_with_their_operation() {
        assert!(matches!(
            decode(&[0; 10]),
            Err(IcServiceError::Malformed { .. })
        ));
        // A START cut short.
        let mut start = FcopyRequest::Start(StartFcopy {
            file_name: "f".into(),
            path_name: "/d".into(),
            flags: CopyFlags::default(),
            file_size: 1,
        })
        .build()
        .unwrap();
        start.truncate(100);
        match decode(&start).unwrap() {
            FcopyOp::Refused { operation, refusal } => {
                assert_eq!(operation, FcopyOperation::START_FILE_COPY);
                assert_eq!(refusal.status, status::HV_INVALIDARG);
            }
            other => panic!("{other:?}"),
        }
        let mut unknown = vec![0u8; 36];
        unknown[0] = 7;
        assert!(matches!(
            decode(&unknown).unwrap(),
            FcopyOp::Refused { refusal, .. } if refusal.status == status::HV_E_FAIL
        ));
    }
}
