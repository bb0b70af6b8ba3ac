//! The `image` input processor: an encoded image (PNG/JPEG; grey and RGBA become RGB) decoded
//! within limits, resized (`stretch`, `letterbox`, `center_crop`), put in the declared channel
//! order and layout, and, for float32 graphs, scaled and normalised per channel. CPU-bound: the
//! caller runs it off the async runtime.

use std::io::Cursor;

use ember_core::model::{Channels, Dtype, ImageInput, Layout, Resize};
use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::jpeg::JpegDecoder;
use image::codecs::png::PngDecoder;
use image::{DynamicImage, ImageDecoder, Limits};

use super::InputLimits;
use crate::Error;
use crate::tensor::{Data, Tensor};

/// Where the model's input pixels came from in the original image: `x_original = (x_input -
/// offset_x) / scale_x` (and the same for y). Output processors map boxes back with it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub original_width: u32,
    pub original_height: u32,
    pub scale_x: f32,
    pub scale_y: f32,
    pub offset_x: f32,
    pub offset_y: f32,
}

impl Geometry {
    /// The identity for an input given as a tensor of `width x height`.
    pub fn identity(width: u32, height: u32) -> Self {
        Self {
            original_width: width,
            original_height: height,
            scale_x: 1.0,
            scale_y: 1.0,
            offset_x: 0.0,
            offset_y: 0.0,
        }
    }

    /// An input-pixel box `[x1, y1, x2, y2]` in the original image's pixels, clamped to it.
    pub fn to_original(&self, b: [f32; 4]) -> [f32; 4] {
        let (w, h) = (self.original_width as f32, self.original_height as f32);
        let x = |v: f32| ((v - self.offset_x) / self.scale_x).clamp(0.0, w);
        let y = |v: f32| ((v - self.offset_y) / self.scale_y).clamp(0.0, h);
        [x(b[0]), y(b[1]), x(b[2]), y(b[3])]
    }
}

/// The image processor of one model.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub spec: ImageInput,
}

impl ImageProcessor {
    /// Decodes, checks, resizes and lays out one image as a `[1, ...]` tensor.
    pub fn prepare(
        &self,
        png: bool,
        body: &[u8],
        limits: InputLimits,
    ) -> Result<(Tensor, Geometry), Error> {
        // The decoders are third-party code fed hostile bytes: one that panics (zune-jpeg 0.5.15
        // does on some malformed JPEGs, found by fuzzing, see docs/fuzzing.md) must fail this
        // job, not the task that holds it (an unacked job and a stuck prefetch slot).
        let decoded = std::panic::catch_unwind(|| {
            if png {
                decode(PngDecoder::new(Cursor::new(body)), limits)
            } else {
                decode(JpegDecoder::new(Cursor::new(body)), limits)
            }
        });
        let image = decoded.unwrap_or_else(|_| {
            Err(Error::InvalidImage(
                "the image decoder failed on this input".into(),
            ))
        })?;
        let (width, height) = (image.width(), image.height());
        let (pixels, geometry) = self.resize(image.into_rgb8().into_raw(), width, height)?;
        Ok((self.layout(pixels)?, geometry))
    }

    /// RGB bytes of `width x height` at the model's size, by the declared resize mode.
    pub fn resize(
        &self,
        rgb: Vec<u8>,
        width: u32,
        height: u32,
    ) -> Result<(Vec<u8>, Geometry), Error> {
        let (tw, th) = (self.spec.width, self.spec.height);
        let (fw, fh) = (width as f32, height as f32);
        let stretch = Geometry {
            original_width: width,
            original_height: height,
            scale_x: tw as f32 / fw,
            scale_y: th as f32 / fh,
            offset_x: 0.0,
            offset_y: 0.0,
        };
        match self.spec.resize {
            Resize::Stretch => Ok((resize_rgb(rgb, width, height, tw, th, None)?, stretch)),
            Resize::CenterCrop => {
                // The shorter side fits; the source window that maps onto the target is cut.
                let s = (tw as f32 / fw).max(th as f32 / fh);
                let (cw, ch) = (tw as f64 / s as f64, th as f64 / s as f64);
                let (left, top) = ((width as f64 - cw) / 2.0, (height as f64 - ch) / 2.0);
                let pixels = resize_rgb(rgb, width, height, tw, th, Some((left, top, cw, ch)))?;
                let geometry = Geometry {
                    scale_x: s,
                    scale_y: s,
                    offset_x: -(left as f32) * s,
                    offset_y: -(top as f32) * s,
                    ..stretch
                };
                Ok((pixels, geometry))
            }
            Resize::Letterbox => {
                let s = (tw as f32 / fw).min(th as f32 / fh);
                let rw = ((fw * s).round() as u32).clamp(1, tw);
                let rh = ((fh * s).round() as u32).clamp(1, th);
                let inner = resize_rgb(rgb, width, height, rw, rh, None)?;
                let (px, py) = ((tw - rw) / 2, (th - rh) / 2);
                let mut canvas = vec![self.spec.fill; (tw * th * 3) as usize];
                let row = (rw * 3) as usize;
                for (y, line) in inner.chunks_exact(row).enumerate() {
                    let at = (((py as usize + y) * tw as usize) + px as usize) * 3;
                    canvas[at..at + row].copy_from_slice(line);
                }
                let geometry = Geometry {
                    scale_x: rw as f32 / fw,
                    scale_y: rh as f32 / fh,
                    offset_x: px as f32,
                    offset_y: py as f32,
                    ..stretch
                };
                Ok((canvas, geometry))
            }
        }
    }

    /// RGB bytes at the model's size -> the graph's tensor: channel order, layout, type.
    pub fn layout(&self, mut rgb: Vec<u8>) -> Result<Tensor, Error> {
        let spec = &self.spec;
        let (w, h) = (i64::from(spec.width), i64::from(spec.height));
        if spec.channels == Channels::Bgr {
            for px in rgb.chunks_exact_mut(3) {
                px.swap(0, 2);
            }
        }
        let shape = match spec.layout {
            Layout::Nhwc => vec![1, h, w, 3],
            Layout::Nchw => vec![1, 3, h, w],
        };
        let data = match (spec.dtype, spec.layout) {
            // The SSD path: the decoded bytes are the tensor, no copy.
            (Dtype::Uint8, Layout::Nhwc) => Data::U8(rgb),
            (Dtype::Uint8, Layout::Nchw) => Data::U8(planar(&rgb, |v, _| v)),
            (Dtype::Float32, layout) => {
                let (mean, std) = spec.normalisation();
                let scale = spec.scale;
                let norm = |v: u8, c: usize| (f32::from(v) * scale - mean[c]) / std[c];
                match layout {
                    Layout::Nchw => Data::F32(planar(&rgb, norm)),
                    Layout::Nhwc => Data::F32(
                        rgb.iter()
                            .enumerate()
                            .map(|(i, &v)| norm(v, i % 3))
                            .collect(),
                    ),
                }
            }
        };
        Tensor::new(shape, data)
    }
}

/// Interleaved `HWC` bytes -> planar `CHW` values.
fn planar<T: Copy + Default>(rgb: &[u8], f: impl Fn(u8, usize) -> T) -> Vec<T> {
    let plane = rgb.len() / 3;
    let mut out = vec![T::default(); rgb.len()];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = f(px[c], c);
        }
    }
    out
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

/// Bilinear resize of RGB bytes, optionally of a source window `(left, top, width, height)`.
fn resize_rgb(
    src: Vec<u8>,
    src_width: u32,
    src_height: u32,
    width: u32,
    height: u32,
    crop: Option<(f64, f64, f64, f64)>,
) -> Result<Vec<u8>, Error> {
    if (src_width, src_height) == (width, height) && crop.is_none() {
        return Ok(src);
    }
    let src = FirImage::from_vec_u8(src_width, src_height, src, PixelType::U8x3)
        .map_err(|e| Error::Internal(format!("resize source: {e}")))?;
    let mut dst = FirImage::new(width, height, PixelType::U8x3);
    let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    if let Some((left, top, w, h)) = crop {
        options = options.crop(left, top, w, h);
    }
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| Error::Internal(format!("resize: {e}")))?;
    Ok(dst.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor(extra: &str) -> ImageProcessor {
        let spec = ember_core::model::ModelSpec::parse(&format!(
            "[input]\nkind = \"image\"\nwidth = 4\nheight = 4\n{extra}"
        ))
        .expect("parses");
        let ember_core::model::InputSpec::Image(spec) = spec.input else {
            panic!("image")
        };
        ImageProcessor { spec }
    }

    #[test]
    fn letterbox_centres_the_image_and_maps_boxes_back() {
        let p = processor("layout = \"nhwc\"\ndtype = \"uint8\"\nresize = \"letterbox\"\nfill = 9");
        // A 4x2 white image into 4x4: rows 1..3 white, rows 0 and 3 the fill.
        let (pixels, geometry) = p.resize(vec![255; 4 * 2 * 3], 4, 2).expect("resizes");
        assert_eq!(&pixels[..12], &[9; 12]);
        assert_eq!(&pixels[12..36], &[255; 24]);
        assert_eq!(&pixels[36..], &[9; 12]);
        assert_eq!(
            geometry.to_original([0.0, 1.0, 4.0, 3.0]),
            [0.0, 0.0, 4.0, 2.0]
        );
    }

    #[test]
    fn center_crop_cuts_the_longer_side_and_stretch_scales_both() {
        let crop = processor("layout = \"nhwc\"\ndtype = \"uint8\"\nresize = \"center_crop\"");
        // 8x4: left half 0, right half 200; the centre 4x4 window at 4x4 is half and half.
        let mut rgb = Vec::new();
        for _y in 0..4 {
            for x in 0..8 {
                rgb.extend([if x < 4 { 0u8 } else { 200 }; 3]);
            }
        }
        let (pixels, geometry) = crop.resize(rgb.clone(), 8, 4).expect("crops");
        assert_eq!(pixels[0], 0);
        assert_eq!(pixels[3 * 3], 200);
        assert_eq!(
            geometry.to_original([0.0, 0.0, 4.0, 4.0]),
            [2.0, 0.0, 6.0, 4.0]
        );
        let stretch = processor("layout = \"nhwc\"\ndtype = \"uint8\"");
        let (_, geometry) = stretch.resize(rgb, 8, 4).expect("stretches");
        assert_eq!(
            geometry.to_original([1.0, 1.0, 2.0, 2.0]),
            [2.0, 1.0, 4.0, 2.0]
        );
    }

    #[test]
    fn bgr_nchw_float_normalises_per_channel() {
        let p = processor(
            "layout = \"nchw\"\ndtype = \"float32\"\nchannels = \"bgr\"\nscale = 0.5\n\
             mean = [1.0, 2.0, 3.0]\nstd = [1.0, 2.0, 4.0]",
        );
        let rgb = [10u8, 20, 30].repeat(16);
        let tensor = p.layout(rgb).expect("lays out");
        assert_eq!(tensor.shape, vec![1, 3, 4, 4]);
        let Data::F32(v) = tensor.data else {
            panic!("f32")
        };
        // Channel 0 is blue (30): (30 * 0.5 - 1) / 1; channel 2 is red (10): (5 - 3) / 4.
        assert_eq!(v[0], 14.0);
        assert_eq!(v[16], (10.0 - 2.0) / 2.0);
        assert_eq!(v[32], 0.5);
    }
}
