//! A request's image slots: each image, then each region of it. The decoder gives an image's
//! `<image>` placeholder the image's rows followed by its regions' rows.

use bytes::Bytes;
use tonic::Status;
use vlm_proto::{GenerateRequest, Region};

/// One image, or one region of one.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub image: Bytes,
    /// Index of the request's image.
    pub image_index: u32,
    pub region: Option<Region>,
}

/// The request's slots in prompt order, checked against the gateway's limits: at most
/// `max_images` images, at most `max_regions` regions per image, every box non-empty and within
/// 0..1000 (INVALID_ARGUMENT naming image, region and box).
pub(crate) fn slots(
    req: &GenerateRequest,
    max_images: usize,
    max_regions: usize,
) -> Result<Vec<Slot>, Status> {
    if !req.images.is_empty() && !req.image_inputs.is_empty() {
        return Err(Status::invalid_argument(
            "gateway: give images either in `images` or in `image_inputs`, not both",
        ));
    }
    let inputs: Vec<(Bytes, &[Region])> = if req.image_inputs.is_empty() {
        req.images.iter().map(|b| (b.clone(), &[][..])).collect()
    } else {
        req.image_inputs
            .iter()
            .map(|i| (i.data.clone(), i.regions.as_slice()))
            .collect()
    };
    if inputs.len() > max_images {
        return Err(Status::invalid_argument(format!(
            "gateway: {} images given; at most {max_images} per request",
            inputs.len()
        )));
    }
    let mut out = Vec::new();
    for (i, (image, regions)) in inputs.into_iter().enumerate() {
        if regions.len() > max_regions {
            return Err(Status::invalid_argument(format!(
                "gateway: image {} has {} regions; at most {max_regions} per image (--max-regions)",
                i,
                regions.len()
            )));
        }
        out.push(Slot {
            image: image.clone(),
            image_index: i as u32,
            region: None,
        });
        for (j, r) in regions.iter().enumerate() {
            check_box(r).map_err(|why| {
                Status::invalid_argument(format!(
                    "gateway: image {} region {} ({},{},{},{}) {why}",
                    i, j, r.x0, r.y0, r.x1, r.y1
                ))
            })?;
            out.push(Slot {
                image: image.clone(),
                image_index: i as u32,
                region: Some(*r),
            });
        }
    }
    Ok(out)
}

/// The encoder checks boxes too; checking here refuses a bad request before any stage is called.
fn check_box(r: &Region) -> Result<(), &'static str> {
    if r.x1 > 1000 || r.y1 > 1000 {
        return Err("lies outside the image: coordinates are relative, 0 to 1000");
    }
    if r.x0 >= r.x1 || r.y0 >= r.y1 {
        return Err("is empty: it needs x0 < x1 and y0 < y1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlm_proto::ImageInput;

    fn req(regions: Vec<Region>) -> GenerateRequest {
        GenerateRequest {
            image_inputs: vec![ImageInput {
                data: Bytes::from_static(b"png"),
                regions,
            }],
            ..Default::default()
        }
    }

    fn r(x0: u32, y0: u32, x1: u32, y1: u32) -> Region {
        Region { x0, y0, x1, y1 }
    }

    #[test]
    fn regions_follow_their_image() {
        let s = slots(&req(vec![r(0, 0, 10, 10), r(5, 5, 500, 900)]), 4, 4).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s[0].region.is_none() && s[1].region.is_some() && s[2].region.is_some());
    }

    #[test]
    fn bad_boxes_and_counts_are_named() {
        let e = slots(&req(vec![r(10, 0, 10, 5)]), 4, 4).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message()
                .contains("image 0 region 0 (10,0,10,5) is empty"),
            "{}",
            e.message()
        );
        let e = slots(&req(vec![r(0, 0, 1001, 5)]), 4, 4).unwrap_err();
        assert!(e.message().contains("outside"), "{}", e.message());
        let e = slots(&req(vec![r(0, 0, 1, 1); 3]), 4, 2).unwrap_err();
        assert!(e.message().contains("at most 2"), "{}", e.message());
    }
}
