//! In-flight masking of result rows: a `MaskPlan` built once per RowDescription (or per
//! Execute, from the portal's description and Bind's format codes), and the rewrite of
//! each DataRow with it, straight into the output buffer.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::policy::{ColumnMask, SessionMasks};
use crate::protocol::backend::FieldDescription;
use crate::protocol::frame::BodyReader;
use crate::protocol::{Frame, ProtocolError};

/// Per result column: the mask to apply and whether the value is in binary format.
#[derive(Debug)]
pub struct MaskPlan {
    columns: Vec<Option<(Arc<ColumnMask>, bool)>>,
}

impl MaskPlan {
    /// The plan for rows described by `fields`, whose formats come from `format_of`;
    /// `None` when no column is masked.
    pub fn build(
        fields: &[FieldDescription],
        masks: &SessionMasks,
        format_of: impl Fn(usize) -> i16,
    ) -> Option<Arc<MaskPlan>> {
        let columns: Vec<_> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                masks
                    .of_attr(f.table_oid, f.column)
                    .map(|m| (m.clone(), format_of(i) == 1))
            })
            .collect();
        columns
            .iter()
            .any(Option::is_some)
            .then(|| Arc::new(MaskPlan { columns }))
    }

    /// Appends `row` with its masked columns rewritten; `scratch` is reused between rows.
    pub fn rewrite(
        &self,
        row: &Frame,
        out: &mut BytesMut,
        scratch: &mut Vec<u8>,
    ) -> Result<u64, ProtocolError> {
        let mut r = BodyReader::new(row.body(), "DataRow");
        let n = r.count(4)?;
        let start = out.len();
        out.put_u8(b'D');
        out.put_i32(0);
        out.put_i16(n as i16);
        let mut masked = 0;
        for i in 0..n {
            let len = r.i32()?;
            if len < 0 {
                out.put_i32(-1);
                continue;
            }
            let value = r.bytes(len as usize)?;
            match self.columns.get(i).and_then(Option::as_ref) {
                Some((mask, binary)) => {
                    masked += 1;
                    scratch.clear();
                    let produced = match &mask.masker {
                        Some(m) => m.apply(mask.class, *binary, value, scratch),
                        None => false,
                    };
                    if produced {
                        out.put_i32(scratch.len() as i32);
                        out.put_slice(scratch);
                    } else {
                        out.put_i32(-1);
                    }
                }
                None => {
                    out.put_i32(len);
                    out.put_slice(value);
                }
            }
        }
        r.finish()?;
        let frame_len = (out.len() - start - 1) as i32;
        out[start + 1..start + 5].copy_from_slice(&frame_len.to_be_bytes());
        Ok(masked)
    }
}
