//! Screenshots: QEMU's `screendump` (what `virDomainScreenshot` returns) is a binary PPM (P6);
//! reports and the repository want PNG. Pure code.

use crate::error::{Error, ErrorKind, Result};

/// Largest accepted screenshot, in pixels (16384 × 16384).
const MAX_PIXELS: u64 = 1 << 28;

fn bad(why: &str) -> Error {
    Error::new(ErrorKind::Source, format!("unusable screenshot: {why}"))
}

/// Parses a binary PPM (P6, maxval ≤ 255): `(width, height, RGB bytes)`.
pub fn parse_ppm(data: &[u8]) -> Result<(u32, u32, &[u8])> {
    let mut pos = 0usize;
    let mut fields: Vec<u64> = Vec::new();
    if data.get(..2) != Some(b"P6") {
        return Err(bad("not a binary PPM (P6)"));
    }
    pos += 2;
    while fields.len() < 3 {
        let c = *data.get(pos).ok_or_else(|| bad("truncated header"))?;
        if c == b'#' {
            while data.get(pos).is_some_and(|&c| c != b'\n') {
                pos += 1;
            }
        } else if c.is_ascii_whitespace() {
            pos += 1;
        } else if c.is_ascii_digit() {
            let mut v: u64 = 0;
            while let Some(&d) = data.get(pos).filter(|d| d.is_ascii_digit()) {
                v = v
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u64::from(d - b'0')))
                    .ok_or_else(|| bad("number too large"))?;
                pos += 1;
            }
            fields.push(v);
        } else {
            return Err(bad("bad header"));
        }
    }
    // Exactly one whitespace byte after maxval.
    if !data.get(pos).is_some_and(u8::is_ascii_whitespace) {
        return Err(bad("bad header end"));
    }
    pos += 1;
    let (w, h, maxval) = (fields[0], fields[1], fields[2]);
    if w == 0 || h == 0 || w.saturating_mul(h) > MAX_PIXELS {
        return Err(bad("bad dimensions"));
    }
    if maxval == 0 || maxval > 255 {
        return Err(bad("only 8-bit PPM is supported"));
    }
    let need = usize::try_from(w * h * 3).map_err(|_| bad("too large"))?;
    let pixels = data
        .get(pos..)
        .and_then(|p| p.get(..need))
        .ok_or_else(|| bad("truncated pixel data"))?;
    let w = u32::try_from(w).map_err(|_| bad("too wide"))?;
    let h = u32::try_from(h).map_err(|_| bad("too high"))?;
    Ok((w, h, pixels))
}

/// Encodes RGB pixels as PNG.
pub fn rgb_to_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let mut w = enc
            .write_header()
            .map_err(|e| Error::with_source(ErrorKind::Other, "cannot encode PNG", e))?;
        w.write_image_data(rgb)
            .map_err(|e| Error::with_source(ErrorKind::Other, "cannot encode PNG", e))?;
        w.finish()
            .map_err(|e| Error::with_source(ErrorKind::Other, "cannot encode PNG", e))?;
    }
    Ok(out)
}

/// PPM → PNG.
pub fn ppm_to_png(ppm: &[u8]) -> Result<Vec<u8>> {
    let (w, h, rgb) = parse_ppm(ppm)?;
    rgb_to_png(w, h, rgb)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace
mod tests {
    use super::*;

    #[test]
    fn ppm_round_trip_to_png() {
        let mut ppm = b"P6\n# made by a test\n2 1\n255\n".to_vec();
        ppm.extend_from_slice(&[255, 0, 0, 0, 0, 255]);
        let (w, h, px) = parse_ppm(&ppm).unwrap();
        assert_eq!((w, h, px.len()), (2, 1, 6));
        let png_bytes = ppm_to_png(&ppm).unwrap();
        assert_eq!(&png_bytes[..8], b"\x89PNG\r\n\x1a\n");
        let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(&buf[..6], &[255, 0, 0, 0, 0, 255]);
    }

    #[test]
    fn malformed_ppm_is_an_error() {
        for bad in [
            &b""[..],
            b"P3\n1 1\n255\n",
            b"P6\n1 1\n255\n\x00\x00",
            b"P6\n0 1\n255\n",
            b"P6\n1 1\n65535\n\x00\x00\x00\x00\x00\x00",
            b"P6\n99999999 99999999\n255\n",
            b"P6 1 1 255",
            b"P6\n184467440737095516150 1\n255\n",
        ] {
            assert!(parse_ppm(bad).is_err(), "{bad:?}");
        }
    }
}
