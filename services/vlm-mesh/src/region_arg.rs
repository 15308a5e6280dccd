//! `--region [IMAGE:]x0,y0,x1,y1`: a region of interest of one of the request's images, in
//! relative coordinates 0–1000 (IMAGE counts from 0 and defaults to the first image).

use anyhow::{bail, Context};
use vlm_model::Region;

/// A parsed `--region` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionArg {
    pub image: usize,
    pub region: Region,
}

/// clap value parser for `--region`.
pub fn parse(s: &str) -> anyhow::Result<RegionArg> {
    let (image, coords) = match s.split_once(':') {
        Some((i, rest)) => (
            i.trim()
                .parse::<usize>()
                .with_context(|| format!("image index '{i}' is not a number"))?,
            rest,
        ),
        None => (0, s),
    };
    let v = coords
        .split(',')
        .map(|c| c.trim().parse::<u32>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("'{coords}' is not four numbers x0,y0,x1,y1 (0-1000)"))?;
    let [x0, y0, x1, y1] = v[..] else {
        bail!("'{coords}' is not four numbers x0,y0,x1,y1 (0-1000)");
    };
    Ok(RegionArg {
        image,
        region: Region::new(x0, y0, x1, y1)?,
    })
}

/// The regions of each of `images` images, refusing a region of an image that is not there.
pub fn per_image(args: &[RegionArg], images: usize) -> anyhow::Result<Vec<Vec<Region>>> {
    let mut out = vec![Vec::new(); images];
    for a in args {
        match out.get_mut(a.image) {
            Some(v) => v.push(a.region),
            None => bail!(
                "--region {}:{} names image {} but only {images} image(s) were given (counting from 0)",
                a.image,
                a.region,
                a.image
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_and_without_image_index() {
        let a = parse("100,200,700,900").unwrap();
        assert_eq!(
            (a.image, a.region),
            (0, Region::new(100, 200, 700, 900).unwrap())
        );
        assert_eq!(parse("1: 0,0,500,500").unwrap().image, 1);
        assert!(parse("1,2,3").is_err());
        assert!(parse("500,0,400,10")
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(per_image(&[parse("2:0,0,1,1").unwrap()], 1).is_err());
    }
}
