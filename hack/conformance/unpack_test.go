package conformance

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/images"
	"github.com/containerd/containerd/leases"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/remotes/docker"
)

// layerDirs lists <repo>/layers: one directory per unpacked layer.
func layerDirs(t *testing.T, repoRoot string) map[string]bool {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(repoRoot, "layers"))
	if err != nil {
		t.Fatalf("read layers dir: %v", err)
	}
	out := make(map[string]bool, len(entries))
	for _, e := range entries {
		out[e.Name()] = true
	}
	return out
}

func added(before, after map[string]bool) []string {
	var out []string
	for k := range after {
		if !before[k] {
			out = append(out, k)
		}
	}
	return out
}

// TestRemoteSnapshotUnpack pulls an image with containerd's own client-side
// unpacker (the one nerdctl and CRI use, which sends containerd.io/snapshot.ref)
// into two namespaces, and checks that the second pull found every layer in
// the fractal repo instead of extracting it again.
func TestRemoteSnapshotUnpack(t *testing.T) {
	addr := os.Getenv("FRACTAL_CONTAINERD_ADDRESS")
	ref := os.Getenv("FRACTAL_TEST_IMAGE")
	repoRoot := os.Getenv("FRACTAL_REPO_ROOT")
	if addr == "" || ref == "" || repoRoot == "" {
		t.Skip("needs FRACTAL_CONTAINERD_ADDRESS, FRACTAL_TEST_IMAGE and FRACTAL_REPO_ROOT")
	}
	client, err := containerd.New(addr, containerd.WithTimeout(10*time.Second))
	if err != nil {
		t.Fatalf("connect to containerd at %s: %v", addr, err)
	}
	defer client.Close()

	resolver := docker.NewResolver(docker.ResolverOptions{PlainHTTP: true})
	suffix := time.Now().Format("150405.000000")
	nsA, nsB := "conformance-a-"+suffix, "conformance-b-"+suffix

	pull := func(ns string) containerd.Image {
		t.Helper()
		ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), 5*time.Minute)
		defer cancel()
		img, err := client.Pull(ctx, ref,
			containerd.WithPullUnpack,
			containerd.WithPullSnapshotter("fractal"),
			containerd.WithResolver(resolver),
		)
		if err != nil {
			t.Fatalf("pull %s into namespace %s: %v", ref, ns, err)
		}
		ok, err := img.IsUnpacked(ctx, "fractal")
		if err != nil || !ok {
			t.Fatalf("image %s in namespace %s not unpacked for fractal (ok=%v err=%v)", ref, ns, ok, err)
		}
		return img
	}
	defer cleanupNamespace(t, client, nsB)
	defer cleanupNamespace(t, client, nsA)

	// Layer directories are named by a never-reused id, so a new entry means an
	// extraction; entries may vanish meanwhile (other namespaces' garbage).
	before := layerDirs(t, repoRoot)
	pull(nsA)
	afterA := layerDirs(t, repoRoot)
	t.Logf("layer dirs: before=%d after A=%d (new in A: %v)", len(before), len(afterA), added(before, afterA))

	pull(nsB)
	afterB := layerDirs(t, repoRoot)
	t.Logf("layer dirs: after B=%d", len(afterB))
	if extra := added(afterA, afterB); len(extra) != 0 {
		t.Errorf("the second namespace's unpack extracted layers again: new layer dirs %v", extra)
	}

	// B's image is usable: its snapshot chain exists and can be prepared.
	ctxB := namespaces.WithNamespace(context.Background(), nsB)
	img, err := client.GetImage(ctxB, ref)
	if err != nil {
		t.Fatalf("get image in %s: %v", nsB, err)
	}
	diffIDs, err := img.RootFS(ctxB)
	if err != nil {
		t.Fatalf("rootfs of image in %s: %v", nsB, err)
	}
	sn := client.SnapshotService("fractal")
	chain := identityChainID(diffIDs)
	if _, err := sn.Stat(ctxB, chain); err != nil {
		t.Errorf("stat top snapshot %s in %s: %v", chain, nsB, err)
	}
	// A snapshot made outside a lease is garbage to containerd's GC, which may run
	// (triggered by the other namespace's image deletes) between Prepare and Remove
	// and delete it first: hold this check's snapshot in a lease, as every client must.
	ctxL, done, err := client.WithLease(ctxB)
	if err != nil {
		t.Fatalf("lease in %s: %v", nsB, err)
	}
	defer done(ctxB)
	key := "conformance-check-" + suffix
	mounts, err := sn.Prepare(ctxL, key, chain)
	if err != nil {
		t.Errorf("prepare on top of %s in %s: %v", chain, nsB, err)
	} else {
		if len(mounts) == 0 {
			t.Errorf("prepare returned no mounts")
		}
		if err := sn.Remove(ctxL, key); err != nil {
			t.Errorf("remove %s: %v", key, err)
		}
	}
}

func cleanupNamespace(t *testing.T, client *containerd.Client, ns string) {
	ctx := namespaces.WithNamespace(context.Background(), ns)
	is := client.ImageService()
	imgs, err := is.List(ctx)
	if err != nil {
		t.Errorf("list images in %s: %v", ns, err)
		return
	}
	for _, img := range imgs {
		if err := is.Delete(ctx, img.Name, images.SynchronousDelete()); err != nil {
			t.Errorf("delete image %s in %s: %v", img.Name, ns, err)
		}
	}
	ls := client.LeasesService()
	if lss, err := ls.List(ctx); err == nil {
		for _, l := range lss {
			_ = ls.Delete(ctx, l, leases.SynchronousDelete)
		}
	}
	// Anything left (snapshots of other kinds, content) is collected by the GC run
	// that the synchronous delete triggered; the namespace goes once it is empty.
	if err := client.NamespaceService().Delete(ctx, ns); err != nil {
		t.Logf("delete namespace %s: %v (left for the environment's cleanup)", ns, err)
	}
}
