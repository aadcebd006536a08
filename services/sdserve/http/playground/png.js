// PNG bytes in the page: base64 <-> bytes, the `parameters` text chunk sdserve writes into
// every image (AUTOMATIC1111's format, `png_parameters` in sdserve/api/types.py), and that
// text read back into form settings.

export function base64ToBytes(b64) {
  const text = atob(b64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

export function bytesToDataUrl(bytes, type = "image/png") {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return `data:${type};base64,${btoa(text)}`;
}

/** The PNG's tEXt chunks as {keyword: text} (Latin-1, as the PNG standard says). */
export function pngText(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const texts = {};
  const latin1 = new TextDecoder("latin1");
  let at = 8; // after the 8-byte signature; then chunks: length, type, data, CRC
  while (at + 8 <= bytes.length) {
    const length = view.getUint32(at);
    const type = latin1.decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    if (type === "tEXt") {
      const nul = data.indexOf(0);
      texts[latin1.decode(data.subarray(0, nul))] = latin1.decode(data.subarray(nul + 1));
    }
    if (type === "IEND") break;
    at += 12 + length;
  }
  return texts;
}

/**
 * AUTOMATIC1111's parameters text -> {prompt, negative_prompt, fields: {"Steps": "20", ...}}.
 * The last line holds "Key: value" pairs separated by ", "; the lines before it are the prompt
 * and an optional "Negative prompt: ..." line.
 */
export function parseParameters(text) {
  const lines = text.split("\n");
  const fields = {};
  for (const pair of lines.pop().split(", ")) {
    const colon = pair.indexOf(": ");
    if (colon > 0) fields[pair.slice(0, colon)] = pair.slice(colon + 2);
  }
  const negativeAt = lines.findIndex((line) => line.startsWith("Negative prompt: "));
  const promptLines = negativeAt < 0 ? lines : lines.slice(0, negativeAt);
  const negative = negativeAt < 0 ? "" : lines.slice(negativeAt).join("\n");
  return {
    prompt: promptLines.join("\n"),
    negative_prompt: negative.replace(/^Negative prompt: /, ""),
    fields,
  };
}
