"""The demo shipped in examples/browser, driven as a person would use it, and the frame
parser of its client fed coalesced and split messages inside the browser."""
from __future__ import annotations

import pytest

import ksw1fast

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]


async def test_demo_page_connects_echoes_and_resolves(chromium, pages, token, token_file,
                                                      echo_port, output_dir) -> None:
    async with await ksw1fast.start_gateway(port=0, token_file=token_file) as gw:
        page = await chromium.open(pages.url("/index.html"))
        await page.fill("#url", gw.address)
        await page.fill("#token", token)
        await page.click("#connect-form button")
        await page.wait_for_selector("#status[data-ok=true]")
        assert "HALF_CLOSE, DNS, UDP, PKCS11 (0x2e)" in await page.inner_text("#info")

        await page.fill("#target", f"127.0.0.1:{echo_port}")
        await page.fill("#mib", "8")
        await page.click("#echo-form button")
        await page.wait_for_selector("#echo-result[data-ok=true], #echo-result[data-ok=false]")
        assert "echoed back intact" in await page.inner_text("#echo-result")

        await page.click("#dns-form button")
        await page.wait_for_selector("#dns-result[data-ok=true], #dns-result[data-ok=false]")
        assert "127.0.0.1" in await page.inner_text("#dns-result")

        # what examples/browser/screenshot.png is made from
        output_dir.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=output_dir / "demo.png", full_page=True)
    assert not [line for line in chromium.console(page) if line.startswith(("error", "uncaught"))]


PARSER_CHECK = """async () => {
  const { FrameParser, encodeFrame } = await import('./ksw1.js');
  const frames = [encodeFrame(0x20, 1, new TextEncoder().encode('abc'), 1),
                  encodeFrame(0x41, 7, new Uint8Array(300).fill(9)),
                  encodeFrame(0x31, 2)];
  const stream = new Uint8Array(frames.reduce((n, f) => n + f.length, 0));
  frames.reduce((at, f) => { stream.set(f, at); return at + f.length; }, 0);
  const parse = (cuts) => {
    const parser = new FrameParser();
    const seen = [];
    cuts.forEach((cut, i) => seen.push(...parser.feed(stream.slice(cut, cuts[i + 1] ?? stream.length).buffer)));
    return seen.map(f => [f.type, f.flags, f.id, f.payload.length, f.payload[0] ?? null]);
  };
  let badMagic = null;
  try { new FrameParser().feed(new Uint8Array(16).buffer); } catch (e) { badMagic = e.message; }
  return {
    coalesced: parse([0]),
    bytewise: parse(Array.from(stream, (_, i) => i)),
    splitInHeaderAndPayload: parse([0, 5, 25, 200]),
    badMagic,
  };
}"""


async def test_frame_parser_handles_coalesced_and_split_frames(chromium, pages) -> None:
    page = await chromium.open(pages.url("/index.html"))
    checked = await page.evaluate(PARSER_CHECK)
    expected = [[0x20, 1, 1, 3, ord("a")], [0x41, 0, 7, 300, 9], [0x31, 0, 2, 0, None]]
    assert checked["coalesced"] == expected
    assert checked["bytewise"] == expected
    assert checked["splitInHeaderAndPayload"] == expected
    assert checked["badMagic"] == "not a KSW1 v1 frame"
