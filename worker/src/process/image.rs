//! Job body -> model input: content-type check, size limits, decode (PNG/JPEG; grey and RGBA
//! become RGB), resize. CPU-bound: the caller runs it off the async runtime.

use std::io::Cursor;

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::jpeg::JpegDecoder;
use image::codecs::png::PngDecoder;
use image::{DynamicImage, ImageDecoder, Limits};

use ember_core::model::{InputSpec, ModelSpec};
use ember_core::protocol::oip::InferRequest;

use crate::Error;

/// Limits applied before and during decoding (decompression bombs).
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
}

impl InputLimits {
    /// The worker's defaults (`--max-input-bytes`, `--max-pixels`).
    pub const DEFAULT: Self = Self {
        max_bytes: 16 * 1024 * 1024,
        max_pixels: 40_000_000,
    };
}

/// An image ready for the model: `width x height x 3` RGB bytes at the model's input size, and
/// the size of the original image (to map boxes back to its pixels).
#[derive(Debug)]
pub struct Prepared {
    pub pixels: Vec<u8>,
    pub original_width: u32,
    pub original_height: u32,
    /// The job was an Open Inference Protocol tensor request: answer with raw output tensors.
    pub raw_outputs: bool,
}

/// The model's input, as the preprocessing needs it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The input tensor's name (tensor requests must name it).
    pub tensor: String,
    pub width: u32,
    pub height: u32,
}

impl Target {
    /// The input `spec` describes.
    pub fn of(spec: &ModelSpec) -> Self {
        let InputSpec::Image {
            tensor,
            width,
            height,
            ..
        } = &spec.input;
        Self {
            tensor: tensor.clone(),
            width: *width,
            height: *height,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
    Tensor,
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_MAGIC: &[u8] = b"\xff\xd8\xff";

fn sniff(body: &[u8]) -> Option<Format> {
    if body.starts_with(PNG_MAGIC) {
        Some(Format::Png)
    } else if body.starts_with(JPEG_MAGIC) {
        Some(Format::Jpeg)
    } else {
        None
    }
}

/// The format a job's content type names. A missing or generic content type (plain AMQP clients
/// often send none) is resolved from the body's magic bytes.
fn format_of(content_type: Option<&str>, body: &[u8]) -> Result<Format, Error> {
    let essence = content_type
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match essence.as_str() {
        "image/png" => Ok(Format::Png),
        "application/json" => Ok(Format::Tensor),
        "image/jpeg" | "image/jpg" => Ok(Format::Jpeg),
        "" | "application/octet-stream" => sniff(body).ok_or_else(|| {
            Error::InvalidImage("no content type and the body is neither PNG nor JPEG".into())
        }),
        _ => Err(Error::UnsupportedContentType(essence)),
    }
}

/// Decodes, checks and resizes one job body.
pub fn prepare(
    content_type: Option<&str>,
    body: &[u8],
    limits: InputLimits,
    target: &Target,
) -> Result<Prepared, Error> {
    let (width, height) = (target.width, target.height);
    if body.is_empty() {
        return Err(Error::InvalidInput("the job body is empty".into()));
    }
    if body.len() > limits.max_bytes {
        return Err(Error::InputTooLarge(format!(
            "the body is {} bytes; the limit is {}",
            body.len(),
            limits.max_bytes
        )));
    }
    let format = format_of(content_type, body)?;
    if format == Format::Tensor {
        return prepare_tensor(body, limits, target);
    }
    // The decoders are third-party code fed hostile bytes: one that panics (zune-jpeg 0.5.15
    // does on some malformed JPEGs, found by fuzzing, see docs/fuzzing.md) must fail this job,
    // not the task that holds it (an unacked job and a stuck prefetch slot).
    let decoded = std::panic::catch_unwind(|| match format {
        Format::Png => decode(PngDecoder::new(Cursor::new(body)), limits),
        _ => decode(JpegDecoder::new(Cursor::new(body)), limits),
    });
    let image = decoded.unwrap_or_else(|_| {
        Err(Error::InvalidImage(
            "the image decoder failed on this input".into(),
        ))
    })?;
    let (original_width, original_height) = (image.width(), image.height());
    let rgb = image.into_rgb8();
    let pixels = resize_rgb(
        rgb.into_raw(),
        original_width,
        original_height,
        width,
        height,
    )?;
    Ok(Prepared {
        pixels,
        original_width,
        original_height,
        raw_outputs: false,
    })
}

/// An Open Inference Protocol request with one UINT8 NHWC image tensor `[1, H, W, 3]`.
fn prepare_tensor(body: &[u8], limits: InputLimits, target: &Target) -> Result<Prepared, Error> {
    let request: InferRequest = serde_json::from_slice(body)
        .map_err(|e| Error::InvalidInput(format!("not an inference request: {e}")))?;
    let [input] = request.inputs.as_slice() else {
        return Err(Error::InvalidInput(format!(
            "expected one input tensor `{}`, got {}",
            target.tensor,
            request.inputs.len()
        )));
    };
    if input.name != target.tensor {
        return Err(Error::InvalidInput(format!(
            "unknown input `{}`; the model's input is `{}`",
            input.name, target.tensor
        )));
    }
    if input.datatype != "UINT8" {
        return Err(Error::InvalidInput(format!(
            "input `{}` must be UINT8, not {}",
            input.name, input.datatype
        )));
    }
    let &[1, h, w, 3] = input.shape.as_slice() else {
        return Err(Error::InvalidInput(format!(
            "input shape must be [1, H, W, 3] (NHWC, one image), not {:?}",
            input.shape
        )));
    };
    let (Ok(h), Ok(w)) = (u32::try_from(h), u32::try_from(w)) else {
        return Err(Error::InvalidInput("negative dimensions".into()));
    };
    if h == 0 || w == 0 {
        return Err(Error::InvalidInput(format!("the image is {w}x{h}")));
    }
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(Error::InputTooLarge(format!(
            "the image is {w}x{h}; the limit is {} pixels",
            limits.max_pixels
        )));
    }
    // In u64: `w * h * 3` overflows u32 once the pixel limit is over 1.4 G.
    let expected = usize::try_from(u64::from(w) * u64::from(h) * 3)
        .map_err(|_| Error::InputTooLarge(format!("the image is {w}x{h}")))?;
    // Every value takes two bytes of JSON at least: a short body cannot make a large allocation
    // by claiming a large shape.
    let mut pixels = Vec::with_capacity(expected.min(body.len() / 2));
    flatten_u8(&input.data, &mut pixels, expected)?;
    if pixels.len() != expected {
        return Err(Error::InvalidInput(format!(
            "shape {:?} needs {expected} values, the data has {}",
            input.shape,
            pixels.len()
        )));
    }
    Ok(Prepared {
        pixels: resize_rgb(pixels, w, h, target.width, target.height)?,
        original_width: w,
        original_height: h,
        raw_outputs: true,
    })
}

fn flatten_u8(value: &serde_json::Value, out: &mut Vec<u8>, limit: usize) -> Result<(), Error> {
    match value {
        serde_json::Value::Array(items) => {
            for item in items {
                flatten_u8(item, out, limit)?;
            }
            Ok(())
        }
        serde_json::Value::Number(n) => {
            if out.len() >= limit {
                return Err(Error::InvalidInput("more data than the shape says".into()));
            }
            let v = n
                .as_u64()
                .and_then(|v| u8::try_from(v).ok())
                .ok_or_else(|| Error::InvalidInput(format!("{n} is not a UINT8")))?;
            out.push(v);
            Ok(())
        }
        other => Err(Error::InvalidInput(format!(
            "tensor data must be numbers, found {other}"
        ))),
    }
}

fn decode<D: ImageDecoder>(
    decoder: image::ImageResult<D>,
    limits: InputLimits,
) -> Result<DynamicImage, Error> {
    let mut decoder = decoder.map_err(|e| Error::InvalidImage(e.to_string()))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::InvalidImage(format!("the image is {w}x{h}")));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limits.max_pixels {
        return Err(Error::InputTooLarge(format!(
            "the image is {w}x{h} = {pixels} pixels; the limit is {}",
            limits.max_pixels
        )));
    }
    let mut decode_limits = Limits::default();
    // Enough for the pixels at 16 bits x 4 channels plus the decoder's own buffers.
    decode_limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    decoder
        .set_limits(decode_limits)
        .map_err(|e| Error::InputTooLarge(e.to_string()))?;
    DynamicImage::from_decoder(decoder).map_err(|e| match e {
        image::ImageError::Limits(e) => Error::InputTooLarge(e.to_string()),
        other => Error::InvalidImage(other.to_string()),
    })
}

fn resize_rgb(
    src: Vec<u8>,
    src_width: u32,
    src_height: u32,
    width: u32,
    height: u32,
) -> Result<Vec<u8>, Error> {
    if (src_width, src_height) == (width, height) {
        return Ok(src);
    }
    let src = FirImage::from_vec_u8(src_width, src_height, src, PixelType::U8x3)
        .map_err(|e| Error::Internal(format!("resize source: {e}")))?;
    let mut dst = FirImage::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| Error::Internal(format!("resize: {e}")))?;
    Ok(dst.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_core::protocol::ErrorCode;

    const LIMITS: InputLimits = InputLimits {
        max_bytes: 1 << 20,
        max_pixels: 1 << 20,
    };

    fn target(width: u32, height: u32) -> Target {
        Target {
            tensor: "image_tensor:0".into(),
            width,
            height,
        }
    }

    fn png(width: u32, height: u32, color: image::ExtendedColorType, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut out),
            bytes,
            width,
            height,
            color,
        )
        .expect("encodes");
        out
    }

    fn code(result: Result<Prepared, Error>) -> ErrorCode {
        result.expect_err("should fail").code()
    }

    #[test]
    fn grey_and_rgba_become_rgb_at_the_model_size() {
        let grey = png(4, 2, image::ExtendedColorType::L8, &[200; 8]);
        let prepared = prepare(Some("image/png"), &grey, LIMITS, &target(3, 3)).expect("prepares");
        assert_eq!(prepared.pixels.len(), 27);
        assert!(prepared.pixels.iter().all(|&p| p == 200));
        assert_eq!((prepared.original_width, prepared.original_height), (4, 2));

        let rgba = png(
            2,
            2,
            image::ExtendedColorType::Rgba8,
            &[10, 20, 30, 0].repeat(4),
        );
        let prepared = prepare(None, &rgba, LIMITS, &target(2, 2)).expect("sniffs PNG");
        assert_eq!(prepared.pixels, [10, 20, 30].repeat(4));
    }

    #[test]
    fn malformed_bodies_get_their_stable_codes() {
        let good = png(4, 4, image::ExtendedColorType::Rgb8, &[1; 48]);
        assert_eq!(
            code(prepare(Some("image/png"), b"", LIMITS, &target(2, 2))),
            ErrorCode::InvalidInput
        );
        assert_eq!(
            code(prepare(
                Some("image/png"),
                b"not an image",
                LIMITS,
                &target(2, 2)
            )),
            ErrorCode::InvalidImage
        );
        assert_eq!(
            code(prepare(
                Some("image/png"),
                &good[..good.len() / 2],
                LIMITS,
                &target(2, 2)
            )),
            ErrorCode::InvalidImage
        );
        assert_eq!(
            code(prepare(Some("text/plain"), &good, LIMITS, &target(2, 2))),
            ErrorCode::UnsupportedContentType
        );
        let tiny = InputLimits {
            max_bytes: 10,
            max_pixels: 1 << 20,
        };
        assert_eq!(
            code(prepare(Some("image/png"), &good, tiny, &target(2, 2))),
            ErrorCode::InputTooLarge
        );
        let few_pixels = InputLimits {
            max_bytes: 1 << 20,
            max_pixels: 15,
        };
        assert_eq!(
            code(prepare(Some("image/png"), &good, few_pixels, &target(2, 2))),
            ErrorCode::InputTooLarge
        );
        assert_eq!(
            code(prepare(Some("image/jpeg"), &good, LIMITS, &target(2, 2))),
            ErrorCode::InvalidImage
        );
    }

    #[test]
    fn a_header_claiming_a_huge_image_is_refused_before_decoding() {
        let mut bomb = png(1, 1, image::ExtendedColorType::Rgb8, &[0; 3]);
        // IHDR: type at 12..16, width and height at 16..24, CRC over 12..29 at 29..33.
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let error = prepare(Some("image/png"), &bomb, LIMITS, &target(2, 2)).expect_err("refused");
        assert_eq!(error.code(), ErrorCode::InputTooLarge, "{error}");
    }

    #[test]
    fn an_oip_tensor_request_becomes_model_input_and_asks_for_raw_outputs() {
        let request = serde_json::json!({
            "id": "r1",
            "inputs": [{"name": "image_tensor:0", "shape": [1, 1, 2, 3], "datatype": "UINT8",
                        "data": [[1, 2, 3], [4, 5, 6]]}]
        });
        let body = serde_json::to_vec(&request).expect("json");
        let prepared =
            prepare(Some("application/json"), &body, LIMITS, &target(2, 1)).expect("prepares");
        assert_eq!(prepared.pixels, vec![1, 2, 3, 4, 5, 6]);
        assert!(prepared.raw_outputs);
        assert_eq!((prepared.original_width, prepared.original_height), (2, 1));
    }

    #[test]
    fn a_huge_tensor_shape_under_a_huge_pixel_limit_is_an_error_not_an_overflow() {
        // 100000 x 100000 x 3 overflowed u32 (a panic in debug builds, a wrong allocation in
        // release) when the pixel limit let it through.
        let body = br#"{"inputs":[{"name":"image_tensor:0","shape":[1,100000,100000,3],"datatype":"UINT8","data":[1,2,3]}]}"#;
        let unlimited = InputLimits {
            max_bytes: 1 << 20,
            max_pixels: u64::MAX,
        };
        let result = prepare(Some("application/json"), body, unlimited, &target(1, 1));
        assert_eq!(code(result), ErrorCode::InvalidInput);
    }

    #[test]
    fn bad_tensor_requests_are_invalid_input() {
        let cases = [
            serde_json::json!({"inputs": []}),
            serde_json::json!({"inputs": [{"name": "other", "shape": [1,1,1,3], "datatype": "UINT8", "data": [1,2,3]}]}),
            serde_json::json!({"inputs": [{"name": "image_tensor:0", "shape": [1,1,1,3], "datatype": "FP32", "data": [1,2,3]}]}),
            serde_json::json!({"inputs": [{"name": "image_tensor:0", "shape": [1,1,1,3], "datatype": "UINT8", "data": [1,2]}]}),
            serde_json::json!({"inputs": [{"name": "image_tensor:0", "shape": [1,1,1,3], "datatype": "UINT8", "data": [1,2,300]}]}),
            serde_json::json!({"inputs": [{"name": "image_tensor:0", "shape": [2,1,1,3], "datatype": "UINT8", "data": [1,2,3,4,5,6]}]}),
        ];
        for case in cases {
            let body = serde_json::to_vec(&case).expect("json");
            let result = prepare(Some("application/json"), &body, LIMITS, &target(1, 1));
            assert_eq!(code(result), ErrorCode::InvalidInput, "{case}");
        }
        assert_eq!(
            code(prepare(
                Some("application/json"),
                b"{",
                LIMITS,
                &target(1, 1)
            )),
            ErrorCode::InvalidInput
        );
    }
}
