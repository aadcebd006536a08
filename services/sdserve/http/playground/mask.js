// The init image and the inpainting mask painted over it.
//
// Two canvases of the image's own size are stacked (CSS scales both alike): #init-canvas
// shows the image, #mask-canvas holds the strokes. The mask sent to the server is a PNG of
// the image's size, white where painted (repaint) and black elsewhere (keep).

const STROKE = "rgba(255, 64, 160, 1)"; // shown at half opacity (style.css)

export class MaskEditor {
  constructor({ image, mask, brush, erase }) {
    this.image = image; // <canvas id="init-canvas">
    this.mask = mask; // <canvas id="mask-canvas">
    this.brush = brush; // <input type="range">: the brush's diameter in image pixels
    this.erase = erase; // <input type="checkbox">: strokes remove paint
    this.painted = false; // whether any stroke was drawn since the last clear
    this.last = null; // the previous point of the stroke being drawn
    mask.getContext("2d", { willReadFrequently: true }); // hasMask and maskPng read it back
    mask.addEventListener("pointerdown", (e) => this.start(e));
    mask.addEventListener("pointermove", (e) => this.move(e));
    for (const end of ["pointerup", "pointerleave", "pointercancel"]) {
      mask.addEventListener(end, () => (this.last = null));
    }
  }

  /** Shows `bitmap` (an ImageBitmap) and sizes both canvases to it; `source` is the image
   * file as a data URL, sent as it is (no re-encoding). */
  load(bitmap, source) {
    this.source = source;
    for (const canvas of [this.image, this.mask]) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    this.image.getContext("2d").drawImage(bitmap, 0, 0);
    this.clear();
  }

  clear() {
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
    this.painted = false;
  }

  /** The pointer's position in image pixels (the canvas is displayed scaled). */
  point(event) {
    const box = this.mask.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * this.mask.width) / box.width,
      y: ((event.clientY - box.top) * this.mask.height) / box.height,
    };
  }

  start(event) {
    event.preventDefault();
    this.mask.setPointerCapture?.(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const next = this.point(event);
    this.stroke(this.last, next);
    this.last = next;
  }

  /** A round-capped line from `a` to `b`: paint, or erase where "erase" is ticked. */
  stroke(a, b) {
    const ctx = this.mask.getContext("2d");
    ctx.globalCompositeOperation = this.erase.checked ? "destination-out" : "source-over";
    ctx.strokeStyle = STROKE;
    ctx.lineWidth = Number(this.brush.value);
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x + 0.01, b.y); // a zero-length line draws nothing: nudge it into a dot
    ctx.stroke();
    if (!this.erase.checked) this.painted = true;
  }

  /** Whether any pixel of the mask is painted (erasing everything counts as no mask). */
  hasMask() {
    if (!this.painted) return false;
    const { data } = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height);
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return true;
    return false;
  }

  /** The image as a data URL (the request's init_image), as it was loaded. */
  imagePng() {
    return this.source;
  }

  /** The mask as a PNG data URL: white where painted at all, black elsewhere. */
  maskPng() {
    const { width, height } = this.mask;
    const src = this.mask.getContext("2d").getImageData(0, 0, width, height).data;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const ctx = out.getContext("2d");
    const pixels = ctx.createImageData(width, height);
    for (let i = 0; i < src.length; i += 4) {
      const value = src[i + 3] > 0 ? 255 : 0;
      pixels.data.set([value, value, value, 255], i);
    }
    ctx.putImageData(pixels, 0, 0);
    return out.toDataURL("image/png");
  }
}
