// Command stargz-peer runs stargz-snapshotter's library (Debian's
// golang-github-containerd-stargz-snapshotter-dev) as a containerd proxy
// snapshotter on a unix socket: the lazy peer bench/run measures lazystore
// against. Built by bench/peers/build (GOPATH mode, Debian sources only).
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "state directory (snapshots, layer cache)")
	address := flag.String("address", "", "unix socket to serve the snapshotter API on")
	noBackground := flag.Bool("no-background-fetch", false, "do not fetch whole layers in the background")
	noPrefetch := flag.Bool("no-prefetch", false, "do not fetch a layer's prioritized files at mount")
	debug := flag.Bool("debug", false, "debug logging")
	flag.Parse()
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "stargz-peer: -root and -address are required")
		os.Exit(2)
	}
	if *debug {
		logrus.SetLevel(logrus.DebugLevel)
	}
	if err := serve(*root, *address, *noBackground, *noPrefetch); err != nil {
		fmt.Fprintf(os.Stderr, "stargz-peer: %v\n", err)
		os.Exit(1)
	}
}

func serve(root, address string, noBackground, noPrefetch bool) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var config service.Config
	config.NoBackgroundFetch = noBackground
	config.NoPrefetch = noPrefetch
	config.NoPrometheus = true
	sn, err := service.NewStargzSnapshotterService(ctx, root, &config)
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	defer sn.Close()

	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	if err := os.Remove(address); err != nil && !os.IsNotExist(err) {
		return err
	}
	listener, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-signals
		log.G(ctx).Info("stopping")
		server.Stop()
	}()
	log.G(ctx).WithField("address", address).Info("serving")
	if err := server.Serve(listener); err != nil && err != grpc.ErrServerStopped {
		return err
	}
	return nil
}
