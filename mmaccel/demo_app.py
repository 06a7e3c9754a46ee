"""The mmaccel Gradio demo: baseline and accelerated answers side by side, with latencies and a
picture of the visual tokens that were kept. With "Stream" ticked, a video's frames go one by
one into an STC ``StreamSession`` (pruned and prefilled as they arrive) and the accelerated
answer is the session's. ``build_demo(model, processor)`` is a pure factory; ``mmaccel demo``
launches it on 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import gradio as gr
import numpy as np

from mmaccel.methods import list_methods
from mmaccel.pipeline import Pipeline, prepare_media
from mmaccel.vis import kept_token_pictures

DEFAULT_METHOD = "fastv"


class DemoBackend:
    """Runs one question twice (unaccelerated, then accelerated) on a shared model."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def answer(self, image, video, question, method, retention, stream=False, max_new_tokens=24):
        media = self._media(image, video)
        if not question or not question.strip():
            raise gr.Error("Type a question.")
        if stream and media.kind != "video":
            raise gr.Error("Streaming answers about a video: upload one, or untick Stream.")
        base = self._ask("none", None, media, question, max_new_tokens)
        if stream:
            fast, pictures, note = self._stream(retention, media, question, max_new_tokens)
        else:
            (fast, pictures), note = self._ask(method, retention, media, question, max_new_tokens, pictures=True), ""
        return base.text, fast.text, _speed(base.stats, fast.stats) + note, pictures, fast.stats.to_dict()

    def _stream(self, retention, media, question, max_new_tokens):
        """STC's streaming session over the video's frames: (answer, kept-token pictures, a line
        on what the frames cost as they arrived)."""
        from mmaccel.stream import StreamSession
        from mmaccel.vis import stream_pictures

        try:
            session = StreamSession(self.model, self.processor, retention=retention)
            frames = media.items[0]
            for frame in frames:
                session.add_frame(frame)
            ans = session.ask(question, max_new_tokens)
        except ValueError as err:  # e.g. a family without streaming: shown, not a stack trace
            raise gr.Error(str(err)) from None
        arrived = ans.stats.timings["vision"] + ans.stats.timings["append"]
        note = (f"\n\nStreamed: {len(frames)} frames encoded, pruned and prefilled as they arrived "
                f"({arrived * 1e3:.1f} ms in all); the question then took {ans.stats.timings['total'] * 1e3:.1f} ms.")
        return ans, stream_pictures(session, frames), note

    def _media(self, image, video):
        try:
            if image is not None:
                return prepare_media(image)
            if video:
                return prepare_media(video, num_frames=8)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        raise gr.Error("Upload an image or a video first.")

    def _ask(self, method, retention, media, question, max_new_tokens, pictures=False):
        pipe = Pipeline(self.model, self.processor, method=method, retention=retention)
        try:
            try:
                ans = pipe.ask(media, question, max_new_tokens=max_new_tokens)
            except ValueError as err:  # e.g. a video for an image-only model: shown, not a stack trace
                raise gr.Error(str(err)) from None
            if not pictures:
                return ans
            shown = media.items[0] if media.kind == "video" else media.items
            return ans, kept_token_pictures(pipe.handle, shown)
        finally:
            pipe.restore()


def _speed(base, fast) -> str:
    def row(name, s):
        t = s.timings
        return (f"| {name} | {s.visual_tokens_kept}/{s.visual_tokens_in} | {t.get('prefill', 0) * 1e3:.1f} ms | "
                f"{t.get('total', 0) * 1e3:.1f} ms | {s.flop_ratio:.2f}x |")

    return "\n".join(["| run | visual tokens kept | prefill | total | fewer prefill FLOPs |",
                      "|---|---|---|---|---|", row("baseline", base), row(fast.method, fast)])


def build_demo(model, processor) -> gr.Blocks:
    backend = DemoBackend(model, processor)
    with gr.Blocks(title="mmaccel demo") as demo:
        gr.Markdown("# mmaccel\nAsk about an image or a video; compare the answer with fewer visual tokens.")
        with gr.Row():
            image = gr.Image(type="pil", label="Image", elem_id="image")
            video = gr.Video(label="Video", elem_id="video")
        question = gr.Textbox(label="Question", value="Describe the image.", elem_id="question")
        with gr.Row():
            method = gr.Dropdown([m for m in list_methods() if m != "none"], value=DEFAULT_METHOD, label="Method")
            retention = gr.Slider(0.05, 1.0, value=0.25, step=0.01, label="Retention")
            stream = gr.Checkbox(False, label="Stream the video (STC session: frames pruned as they arrive; "
                                 "the method is stc)", elem_id="stream")
        run = gr.Button("Run", variant="primary")
        with gr.Row():
            base_out = gr.Textbox(label="Baseline answer", elem_id="baseline")
            fast_out = gr.Textbox(label="Accelerated answer", elem_id="accelerated")
        speed = gr.Markdown(elem_id="speed")
        kept = gr.Gallery(label="Kept visual tokens (dimmed = dropped)", elem_id="kept", columns=4, height=300,
                          object_fit="contain")
        stats = gr.JSON(label="Stats")
        run.click(backend.answer, [image, video, question, method, retention, stream],
                  [base_out, fast_out, speed, kept, stats], api_name="answer", concurrency_limit=1)
    return demo


def launch(model_dir=None, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    from mmaccel.pipeline import load_model

    if model_dir:
        model, processor = load_model(model_dir)
    else:
        from mmaccel.embedded import load_default_model

        model, processor = load_default_model()
    demo = build_demo(model, processor)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True)
    if block:
        demo.block_thread()
    return demo


