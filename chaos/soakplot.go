package chaos

import (
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"os"
)

// writeSoakPlot draws every series in a panel of its own (two columns),
// time across, the panel's range from the series' minimum to its maximum;
// the warm-up shaded grey, the samples in blue, the fitted line in red.
func writeSoakPlot(path string, r *SoakResult) error {
	const pw, ph, pad, cols = 480, 160, 12, 2
	rows := (len(soakSeries) + cols - 1) / cols
	img := image.NewRGBA(image.Rect(0, 0, cols*(pw+pad)+pad, rows*(ph+pad)+pad))
	draw.Draw(img, img.Bounds(), image.NewUniform(color.White), image.Point{}, draw.Src)
	var end float64
	for _, s := range r.Samples {
		end = math.Max(end, s.at.Hours())
	}
	if end == 0 {
		end = 1
	}
	for i := range soakSeries {
		x0, y0 := pad+(i%cols)*(pw+pad), pad+(i/cols)*(ph+pad)
		panel := image.Rect(x0, y0, x0+pw, y0+ph)
		drawPanel(img, panel, r, i, end)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func drawPanel(img *image.RGBA, p image.Rectangle, r *SoakResult, i int, end float64) {
	grey, blue, red, frame := color.RGBA{230, 230, 230, 255}, color.RGBA{30, 90, 200, 255}, color.RGBA{210, 40, 40, 255}, color.RGBA{120, 120, 120, 255}
	warm := p.Min.X + int(r.WarmUp.Hours()/end*float64(p.Dx()))
	draw.Draw(img, image.Rect(p.Min.X, p.Min.Y, min(warm, p.Max.X), p.Max.Y), image.NewUniform(grey), image.Point{}, draw.Src)
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, s := range r.Samples {
		if v := s.values[i]; !math.IsNaN(v) {
			lo, hi = math.Min(lo, v), math.Max(hi, v)
		}
	}
	if math.IsInf(lo, 0) {
		return
	}
	if hi == lo {
		hi, lo = hi+1, lo-1
	}
	at := func(h, v float64) (int, int) {
		return p.Min.X + int(h/end*float64(p.Dx()-1)), p.Max.Y - 1 - int((v-lo)/(hi-lo)*float64(p.Dy()-1))
	}
	px, py, have := 0, 0, false
	for _, s := range r.Samples {
		v := s.values[i]
		if math.IsNaN(v) {
			have = false
			continue
		}
		x, y := at(s.at.Hours(), v)
		if have {
			line(img, px, py, x, y, blue)
		}
		px, py, have = x, y, true
	}
	if f := r.Fits[i]; f.n >= 3 {
		w := r.WarmUp.Hours()
		mid := (w + end) / 2
		x1, y1 := at(w, f.mean+f.slopePerHour*(w-mid))
		x2, y2 := at(end, f.mean+f.slopePerHour*(end-mid))
		line(img, x1, clamp(y1, p.Min.Y, p.Max.Y-1), x2, clamp(y2, p.Min.Y, p.Max.Y-1), red)
	}
	for x := p.Min.X; x < p.Max.X; x++ {
		img.Set(x, p.Min.Y, frame)
		img.Set(x, p.Max.Y-1, frame)
	}
	for y := p.Min.Y; y < p.Max.Y; y++ {
		img.Set(p.Min.X, y, frame)
		img.Set(p.Max.X-1, y, frame)
	}
}

func clamp(v, lo, hi int) int { return max(lo, min(v, hi)) }

// line draws a straight line (Bresenham).
func line(img *image.RGBA, x0, y0, x1, y1 int, c color.Color) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := 1, 1
	if x0 > x1 {
		sx = -1
	}
	if y0 > y1 {
		sy = -1
	}
	e := dx + dy
	for {
		img.Set(x0, y0, c)
		if x0 == x1 && y0 == y1 {
			return
		}
		e2 := 2 * e
		if e2 >= dy {
			e += dy
			x0 += sx
		}
		if e2 <= dx {
			e += dx
			y0 += sy
		}
	}
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}
