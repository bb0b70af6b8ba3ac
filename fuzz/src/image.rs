//! Target `image`: a job body through the worker's decode and preprocessing
//! (`ember_worker::preprocess::prepare`): content type, size limits, PNG/JPEG decode, OIP JSON
//! tensors, resize. The first input byte picks the content type; the rest is the body.

use std::sync::OnceLock;

use ember_core::model::ModelSpec;
use ember_worker::Error;
use ember_worker::process::{InputLimits, Pipeline, Prepared};
use ember_worker::signature::{Port, Signature};
use ember_worker::tensor::DataType;

/// Limits as a worker would have them, smaller so that the fuzzer stays fast.
pub const LIMITS: InputLimits = InputLimits {
    max_bytes: 1 << 20,
    max_pixels: 1 << 20,
};

/// The model input size the harness resizes to.
pub const SIZE: u32 = 32;

/// The image processor with every resize mode, over a graph shaped like the SSD's
/// (`image_tensor:0` UINT8 `[-1, -1, -1, 3]`): the first byte's high bits pick the mode.
pub fn pipeline(mode: usize) -> &'static Pipeline {
    static PIPELINES: OnceLock<Vec<Pipeline>> = OnceLock::new();
    let all = PIPELINES.get_or_init(|| {
        ["stretch", "letterbox", "center_crop"]
            .into_iter()
            .map(|resize| {
                let spec = ModelSpec::parse(&format!(
                    "[input]\nkind = \"image\"\ntensor = \"image_tensor:0\"\nlayout = \"nhwc\"\n\
                     dtype = \"uint8\"\nwidth = {SIZE}\nheight = {SIZE}\nresize = \"{resize}\"\n\
                     fill = 114\n"
                ))
                .expect("the harness model.toml parses");
                let port = |name: &str, dtype, shape: &[i64]| Port {
                    name: name.into(),
                    dtype,
                    shape: shape.to_vec(),
                };
                // The SSD's graph: what the oip seeds name.
                let signature = Signature::new(
                    vec![port("image_tensor:0", DataType::U8, &[-1, -1, -1, 3])],
                    vec![
                        port("num_detections:0", DataType::F32, &[-1]),
                        port("detection_boxes:0", DataType::F32, &[-1, -1, 4]),
                        port("detection_scores:0", DataType::F32, &[-1, -1]),
                        port("detection_classes:0", DataType::F32, &[-1, -1]),
                    ],
                );
                Pipeline::new(&spec, signature, LIMITS, 8).expect("the harness pipeline")
            })
            .collect()
    });
    &all[mode % all.len()]
}

/// `width x height` of what a job fed the model: the original image, or the tensor's H and W.
pub fn dims(prepared: &Prepared) -> (u32, u32) {
    match &prepared.shape.geometry {
        Some(g) => (g.original_width, g.original_height),
        None => {
            let shape = &prepared.inputs[0].shape;
            (shape[2] as u32, shape[1] as u32)
        }
    }
}

/// Content types the first byte chooses from (index = byte % len).
pub const CONTENT_TYPES: [Option<&str>; 7] = [
    None,
    Some("image/png"),
    Some("image/jpeg"),
    Some("application/json"),
    Some("application/octet-stream"),
    Some("Image/JPG; q=1"),
    Some("text/plain"),
];

/// Prepares one body and checks what any result must satisfy.
pub fn check(
    content_type: Option<&str>,
    header_length: Option<&str>,
    body: &[u8],
    mode: usize,
) -> Result<Prepared, Error> {
    let result = pipeline(mode).prepare(content_type, header_length, body);
    if let Ok(prepared) = &result {
        let input = &prepared.inputs[0];
        assert_eq!(input.data.len() as i64, input.shape.iter().product::<i64>());
        assert!(input.data.len() <= 3 * LIMITS.max_pixels as usize);
        let (w, h) = dims(prepared);
        assert!(w > 0 && h > 0, "a {w}x{h} input was accepted");
        if prepared.shape.geometry.is_some() {
            assert_eq!(input.shape, [1, i64::from(SIZE), i64::from(SIZE), 3]);
            assert!(
                u64::from(w) * u64::from(h) <= LIMITS.max_pixels,
                "a {w}x{h} image passed the pixel limit"
            );
        }
        assert!(body.len() <= LIMITS.max_bytes);
    }
    result
}

/// One fuzz input: selector byte (low bits: the content type; high bits: the resize mode),
/// then the body.
pub fn run(data: &[u8]) -> Option<Result<Prepared, Error>> {
    let (&selector, body) = data.split_first()?;
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    Some(check(content_type, None, body, usize::from(selector >> 6)))
}
